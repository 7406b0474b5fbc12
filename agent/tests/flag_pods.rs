//! Flagging pods in the Kubernetes API, against a mock API server that records every request:
//! the exact Event, pod annotation patch and node status patch kube-rs sends for a
//! rename-ENXIO flag; nothing for a duplicate, a rate-limited pod or a flag with no pod; the
//! node condition set once.

mod support;

use std::time::Duration;

use imgstream::{
    attribution::PodRef,
    flag::{ANNOTATION, Flagger, KubeConfig, NODE_CONDITION, Outcome, REASON},
    starts::store::FlagRecord,
};
use serde_json::json;
use support::kube::mock_api;

fn flag(pod: &str, path: &str) -> FlagRecord {
    FlagRecord {
        time_ns: 1_795_000_000_000_000_000,
        time: "2026-11-18T11:06:40.000Z".into(),
        container_id: Some("c0ffee".into()),
        pod: PodRef {
            uid: Some(format!("uid-{pod}")),
            namespace: Some("shop".into()),
            name: Some(pod.into()),
            container: Some("app".into()),
        },
        image: Some("registry/app:v1".into()),
        path: path.into(),
        new_path: format!("{path}.new"),
        syscall: "renameat2".into(),
        confirmed: true,
    }
}

#[tokio::test]
async fn flags_become_one_event_one_annotation_and_one_node_condition() {
    let (url, seen) = mock_api().await;
    let mut flagger = Flagger::new(KubeConfig {
        node_name: "node-7".into(),
        api_url: Some(url),
        min_interval: Duration::from_secs(600),
    })
    .await
    .unwrap();

    assert_eq!(
        flagger
            .flag(&flag("web", "/etc/alternatives/awk"))
            .await
            .unwrap(),
        Outcome::Flagged
    );
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 3, "{requests:#?}");

    let event = &requests[0];
    assert_eq!(
        (event.method.as_str(), event.path.as_str()),
        ("POST", "/api/v1/namespaces/shop/events")
    );
    assert_eq!(event.content_type, "application/json");
    let e = &event.body;
    assert_eq!(e["reason"], REASON);
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["metadata"]["generateName"], "web.imgstream-");
    assert_eq!(e["metadata"]["namespace"], "shop");
    assert_eq!(
        e["involvedObject"],
        json!({"apiVersion": "v1", "kind": "Pod", "name": "web", "namespace": "shop", "uid": "uid-web"})
    );
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("/etc/alternatives/awk") && message.contains("6.1.55"),
        "{message}"
    );
    assert_eq!(
        e["source"],
        json!({"component": "imgstream", "host": "node-7"})
    );
    assert_eq!(e["firstTimestamp"], "2026-11-18T11:06:40Z");
    assert_eq!(e["count"], 1);

    let patch = &requests[1];
    assert_eq!(
        (patch.method.as_str(), patch.path.as_str()),
        ("PATCH", "/api/v1/namespaces/shop/pods/web")
    );
    assert_eq!(patch.content_type, "application/merge-patch+json");
    assert_eq!(
        patch.body,
        json!({"metadata": {"annotations": {ANNOTATION: "/etc/alternatives/awk at 2026-11-18T11:06:40.000Z"}}})
    );

    let node = &requests[2];
    assert_eq!(
        (node.method.as_str(), node.path.as_str()),
        ("PATCH", "/api/v1/nodes/node-7/status")
    );
    assert_eq!(node.content_type, "application/strategic-merge-patch+json");
    let condition = &node.body["status"]["conditions"][0];
    assert_eq!(condition["type"], NODE_CONDITION);
    assert_eq!(condition["status"], "True");
    assert_eq!(condition["reason"], REASON);

    // The same pod and path again: nothing. Another path of the same pod within the interval:
    // nothing. No pod: nothing.
    assert_eq!(
        flagger
            .flag(&flag("web", "/etc/alternatives/awk"))
            .await
            .unwrap(),
        Outcome::Duplicate
    );
    assert_eq!(
        flagger.flag(&flag("web", "/usr/bin/vi")).await.unwrap(),
        Outcome::RateLimited
    );
    let mut nopod = flag("x", "/a");
    nopod.pod.name = None;
    assert_eq!(flagger.flag(&nopod).await.unwrap(), Outcome::NoPod);
    assert_eq!(seen.lock().unwrap().len(), 3);

    // Another pod: its Event and annotation; the node condition is already set.
    assert_eq!(
        flagger.flag(&flag("api", "/etc/localtime")).await.unwrap(),
        Outcome::Flagged
    );
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 5);
    assert_eq!(requests[3].path, "/api/v1/namespaces/shop/events");
    assert_eq!(requests[4].path, "/api/v1/namespaces/shop/pods/api");
}

#[tokio::test]
async fn an_unreachable_api_server_is_an_error_not_a_hang() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut flagger = Flagger::new(KubeConfig {
        node_name: "node-7".into(),
        api_url: Some(format!("http://127.0.0.1:{port}")),
        min_interval: Duration::from_secs(600),
    })
    .await
    .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(60), flagger.flag(&flag("web", "/a")))
        .await
        .expect("no hang");
    let err = result.unwrap_err().to_string();
    assert!(err.contains("creating an Event for pod shop/web"), "{err}");
}
