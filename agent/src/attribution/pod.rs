//! Which pod, and which container in it, something belongs to: the one identity that start
//! records, flags and CRI metadata share.

use serde::{Deserialize, Serialize};

/// A pod and container as far as they are known: the UID and the containerd namespace from
/// the cgroup path, the names from CRI. Serialised flat, under the keys records have always
/// had (`pod_uid`, `namespace`, `pod`, `container`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// Kubernetes pod UID.
    #[serde(rename = "pod_uid", default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Kubernetes namespace, or containerd namespace for plain containerd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's name.
    #[serde(rename = "pod", default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The container's name in the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl PodRef {
    /// What `self` knows, with `fallback` filling in what it does not (CRI's answer over
    /// what the cgroup path said).
    pub fn or(self, fallback: PodRef) -> PodRef {
        PodRef {
            uid: self.uid.or(fallback.uid),
            namespace: self.namespace.or(fallback.namespace),
            name: self.name.or(fallback.name),
            container: self.container.or(fallback.container),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_under_the_keys_records_always_had_and_merges_field_by_field() {
        let from_cri = PodRef {
            namespace: Some("shop".into()),
            name: Some("web".into()),
            ..Default::default()
        };
        let from_cgroup = PodRef {
            uid: Some("u-1".into()),
            namespace: Some("k8s.io".into()),
            ..Default::default()
        };
        let merged = from_cri.or(from_cgroup);
        assert_eq!(
            serde_json::to_value(&merged).unwrap(),
            serde_json::json!({"pod_uid": "u-1", "namespace": "shop", "pod": "web"})
        );
        let back: PodRef = serde_json::from_str(r#"{"pod":"web","container":"app"}"#).unwrap();
        assert_eq!(back.name.as_deref(), Some("web"));
        assert_eq!(back.container.as_deref(), Some("app"));
    }
}
