//! The DaemonSet in `deploy/`, checked offline (no API server exists here): every document
//! parses into its typed Kubernetes object (k8s-openapi), and what it gives the agent matches
//! what the agent needs: the container's arguments parse (the real binary prints the paths
//! they resolve to), every path the agent opens is under a mount, the FUSE state directory
//! propagates to the host, the probes hit the API's address, the RBAC rules are exactly the
//! calls the flagging makes, and the containerd drop-in is what `imgstream containerd-config`
//! generates for the snapshotter socket the agent serves.

use std::{collections::BTreeSet, path::Path, process::Command};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};

const IMGSTREAM: &str = env!("CARGO_BIN_EXE_imgstream");

struct Manifests {
    daemonset: DaemonSet,
    keeper: DaemonSet,
    configmap: ConfigMap,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    service_account: ServiceAccount,
}

fn load() -> Manifests {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/imgstream.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let (mut cm, mut role, mut binding, mut sa, mut ns) = (None, None, None, None, None);
    let mut daemonsets: Vec<DaemonSet> = Vec::new();
    fn parse<T: serde::de::DeserializeOwned>(kind: &str, value: serde_yaml::Value) -> T {
        serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{kind} does not parse: {e}"))
    }
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc).unwrap();
        let kind = value["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "DaemonSet" => daemonsets.push(parse::<DaemonSet>(&kind, value)),
            "ConfigMap" => cm = Some(parse::<ConfigMap>(&kind, value)),
            "ClusterRole" => role = Some(parse::<ClusterRole>(&kind, value)),
            "ClusterRoleBinding" => binding = Some(parse::<ClusterRoleBinding>(&kind, value)),
            "ServiceAccount" => sa = Some(parse::<ServiceAccount>(&kind, value)),
            "Namespace" => ns = Some(parse::<Namespace>(&kind, value)),
            other => panic!("unexpected kind {other}"),
        }
    }
    assert!(ns.is_some(), "a Namespace");
    let mut named = |name: &str| {
        let at = daemonsets
            .iter()
            .position(|d| d.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("a DaemonSet named {name}"));
        daemonsets.remove(at)
    };
    let (daemonset, keeper) = (named("imgstream"), named("imgstream-fuse-keeper"));
    assert!(daemonsets.is_empty(), "no other DaemonSet");
    Manifests {
        daemonset,
        keeper,
        configmap: cm.expect("a ConfigMap"),
        role: role.expect("a ClusterRole"),
        binding: binding.expect("a ClusterRoleBinding"),
        service_account: sa.expect("a ServiceAccount"),
    }
}

use serde::Deserialize as _;

fn pod_spec(ds: &DaemonSet) -> &k8s_openapi::api::core::v1::PodSpec {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

/// What the agent makes of the DaemonSet's arguments: the real binary's `--print-paths`.
fn agent_paths(args: &[String]) -> serde_json::Value {
    let out = Command::new(IMGSTREAM)
        .args(args)
        .arg("--print-paths")
        .env("IMGSTREAM_NODE_NAME", "node-1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the DaemonSet's arguments do not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_daemonset_gives_the_agent_what_it_uses() {
    let m = load();
    let spec = pod_spec(&m.daemonset);
    assert_eq!(
        spec.host_pid,
        Some(true),
        "detections look at /proc/<pid> of every container"
    );
    assert_eq!(
        spec.host_network,
        Some(true),
        "the probes reach the API on the node's loopback"
    );
    assert_eq!(
        spec.service_account_name.as_deref(),
        m.service_account.metadata.name.as_deref()
    );
    let agent = spec.containers.iter().find(|c| c.name == "agent").unwrap();
    assert_eq!(
        agent.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );

    // The arguments parse, and the paths they resolve to are all under mounts.
    let args = agent.args.clone().unwrap();
    assert_eq!(args[0], "agent");
    let paths = agent_paths(&args);
    assert_eq!(
        paths["flag_pods_as"], "node-1",
        "IMGSTREAM_NODE_NAME turns flagging on"
    );
    let mounts = agent.volume_mounts.clone().unwrap();
    let mounted = |p: &str| {
        mounts
            .iter()
            .find(|m| Path::new(p).starts_with(&m.mount_path))
    };
    for key in [
        "cri_socket",
        "snapshotter_socket",
        "snapshotter_root",
        "fuse_keeper",
        "cache_dir",
        "store",
        "detections",
    ] {
        let path = paths[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} is set"));
        let mount = mounted(path).unwrap_or_else(|| panic!("{key} ({path}) is under no mount"));
        assert_ne!(
            mount.read_only,
            Some(true),
            "{key} ({path}) must be writable"
        );
    }
    for needed in [
        "/dev/fuse",
        "/sys/fs/bpf",
        "/sys/kernel/tracing",
        "/sys/fs/cgroup",
    ] {
        assert!(mounted(needed).is_some(), "{needed} is mounted");
    }
    let state = mounted(paths["snapshotter_root"].as_str().unwrap()).unwrap();
    assert_eq!(
        state.mount_propagation.as_deref(),
        Some("Bidirectional"),
        "lazy layers mounted in the pod must reach containerd on the host"
    );
    let volumes = spec.volumes.clone().unwrap();
    for m in &mounts {
        let volume = volumes.iter().find(|v| v.name == m.name).unwrap();
        assert!(volume.host_path.is_some(), "{} is a host path", m.name);
    }

    // Liveness and readiness ask /healthz where the API listens.
    let api: std::net::SocketAddr = paths["api_addr"].as_str().unwrap().parse().unwrap();
    for probe in [&agent.liveness_probe, &agent.readiness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        assert_eq!(get.host.as_deref(), Some(api.ip().to_string().as_str()));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(api.port()))
        );
    }
    assert!(agent.resources.as_ref().unwrap().requests.is_some());

    // The drop-in is the generated one, for the socket the agent serves.
    let dropin = &m.configmap.data.as_ref().unwrap()["containerd-imgstream.toml"];
    let generated = Command::new(IMGSTREAM)
        .args(["containerd-config", "--socket"])
        .arg(paths["snapshotter_socket"].as_str().unwrap())
        .output()
        .unwrap();
    assert_eq!(
        dropin.as_str(),
        String::from_utf8(generated.stdout).unwrap()
    );
    let init = &spec.init_containers.as_ref().unwrap()[0];
    let script = init.command.as_ref().unwrap().join(" ");
    assert!(script.contains("install-containerd-config.sh"));
    assert!(
        m.configmap
            .data
            .as_ref()
            .unwrap()
            .contains_key("install-containerd-config.sh")
    );
}

#[test]
fn rbac_is_exactly_what_flagging_needs() {
    let m = load();
    let rules: BTreeSet<(String, String)> = m
        .role
        .rules
        .unwrap()
        .iter()
        .flat_map(|r| {
            assert_eq!(
                r.api_groups.as_deref(),
                Some(&[String::new()][..]),
                "core group only"
            );
            let verbs = r.verbs.clone();
            r.resources
                .clone()
                .unwrap()
                .into_iter()
                .flat_map(move |res| verbs.clone().into_iter().map(move |v| (res.clone(), v)))
        })
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("events", "create"),
        ("pods", "patch"),
        ("nodes/status", "patch"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(rules, want);
    let subject = &m.binding.subjects.unwrap()[0];
    assert_eq!(
        Some(subject.name.as_str()),
        m.service_account.metadata.name.as_deref()
    );
    assert_eq!(subject.namespace, m.service_account.metadata.namespace);
    assert_eq!(
        Some(m.binding.role_ref.name.as_str()),
        m.role.metadata.name.as_deref()
    );
}

#[test]
fn the_dockerfile_ships_the_binary_the_build_makes() {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile"))
            .unwrap();
    assert!(dockerfile.contains(
        "COPY target/x86_64-unknown-linux-musl/guest/imgstream /usr/local/bin/imgstream"
    ));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/imgstream\"]"));
}

/// The FUSE keeper runs apart from the agent (a rollout of the agent never restarts it), on
/// the socket the agent is told, through the same host directory.
#[test]
fn the_fuse_keeper_outlives_agent_rollouts_on_the_agents_socket() {
    let m = load();
    let keeper_spec = m.keeper.spec.as_ref().unwrap();
    assert_eq!(
        keeper_spec
            .update_strategy
            .as_ref()
            .and_then(|u| u.type_.as_deref()),
        Some("OnDelete")
    );
    let pod = pod_spec(&m.keeper);
    let keeper = &pod.containers[0];
    let args = keeper.args.clone().unwrap();
    assert_eq!(args[0], "fuse-keeper");
    let socket = args
        .iter()
        .find_map(|a| a.strip_prefix("--socket="))
        .expect("--socket=");
    let out = Command::new(IMGSTREAM)
        .arg("fuse-keeper")
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--socket"));

    let agent_pod = pod_spec(&m.daemonset);
    let agent = agent_pod
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .unwrap();
    let paths = agent_paths(&agent.args.clone().unwrap());
    assert_eq!(paths["fuse_keeper"], socket, "the agent's --fuse-keeper");
    // Both see the socket through the same host directory.
    let host_dir = |spec: &k8s_openapi::api::core::v1::PodSpec,
                    container: &k8s_openapi::api::core::v1::Container| {
        let mount = container
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| Path::new(socket).starts_with(&v.mount_path))
            .expect("the socket's directory is mounted");
        let volume = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap();
        volume.host_path.as_ref().unwrap().path.clone()
    };
    assert_eq!(host_dir(pod, keeper), host_dir(agent_pod, agent));
    // A directory of its own: not the one containerd reaches the snapshotter through.
    let snapshotter = Path::new(paths["snapshotter_socket"].as_str().unwrap());
    assert_ne!(
        Path::new(socket).parent(),
        snapshotter.parent(),
        "the keeper's socket has a directory of its own"
    );
    // And no privilege: every capability dropped, no escalation, a read-only root.
    let security = keeper
        .security_context
        .as_ref()
        .expect("a security context");
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
}
