//! Container and pod identity from a cgroup path, for the naming schemes kubelet and the
//! runtimes use:
//!
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>` (CRI-O: `crio-<id>`),
//!   docker: `/docker/<id>`, plain containerd (`ctr run`): `/<namespace>/<id>`;
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`
//!   (`crio-<id>.scope`, `docker-<id>.scope`, `libpod-<id>.scope`).

use serde::Serialize;

/// The container runtime a cgroup name points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Containerd,
    Crio,
    Docker,
    Podman,
    /// A bare id under a pod cgroup: the runtime does not say its name (containerd's CRI
    /// plugin with the cgroupfs driver does this).
    Unknown,
}

/// Which cgroup driver laid the path out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

/// A container found in a cgroup path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContainerRef {
    pub runtime: Runtime,
    pub container_id: String,
    /// Kubernetes pod UID, when the path is under a pod cgroup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// containerd namespace, for `/<namespace>/<id>` paths of plain containerd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub driver: CgroupDriver,
}

impl ContainerRef {
    /// The pod identity the cgroup path gives: the UID and the containerd namespace.
    pub fn pod_ref(&self) -> super::PodRef {
        super::PodRef {
            uid: self.pod_uid.clone(),
            namespace: self.namespace.clone(),
            ..Default::default()
        }
    }
}

/// Finds the container (and pod) a cgroup v2 path belongs to, if the path names one.
///
/// The innermost component that names a container wins, so a process in a sub-cgroup of a
/// container (systemd inside a container, for instance) is attributed to that container.
pub fn parse_cgroup_path(path: &str) -> Option<ContainerRef> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let pod_uid = parts.iter().rev().find_map(|p| pod_uid_of(p));
    for (i, part) in parts.iter().enumerate().rev() {
        if let Some((runtime, id)) = systemd_scope(part) {
            return Some(ContainerRef {
                runtime,
                container_id: id.to_string(),
                pod_uid,
                namespace: None,
                driver: CgroupDriver::Systemd,
            });
        }
        if let Some((runtime, id)) = cgroupfs_leaf(part) {
            let parent = i.checked_sub(1).map(|p| parts[p]);
            let runtime = match (runtime, parent) {
                (Runtime::Unknown, Some("docker")) => Runtime::Docker,
                (Runtime::Unknown, _) if pod_uid.is_none() => continue,
                (runtime, _) => runtime,
            };
            return Some(ContainerRef {
                runtime,
                container_id: id.to_string(),
                pod_uid,
                namespace: None,
                driver: CgroupDriver::Cgroupfs,
            });
        }
    }
    plain_containerd(&parts)
}

/// A pod's own cgroup, as kubelet creates it before the pod's sandbox: the parent of the
/// pod's containers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodCgroup {
    pub uid: String,
    pub driver: CgroupDriver,
}

/// The pod a cgroup path is the cgroup of: its last component is `pod<uid>` (cgroupfs) or
/// `kubepods[-qos]-pod<uid>.slice` (systemd). A container's cgroup under it is not.
pub fn parse_pod_cgroup(path: &str) -> Option<PodCgroup> {
    let last = path.rsplit('/').find(|p| !p.is_empty())?;
    let uid = pod_uid_of(last)?;
    let driver = if last.ends_with(".slice") {
        CgroupDriver::Systemd
    } else {
        CgroupDriver::Cgroupfs
    };
    Some(PodCgroup { uid, driver })
}

/// `pod<uid>` (cgroupfs) or `kubepods[-qos]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of(part: &str) -> Option<String> {
    if let Some(slice) = part.strip_suffix(".slice") {
        let uid = slice.rsplit_once("-pod")?.1;
        return is_uid(&uid.replace('_', "-")).then(|| uid.replace('_', "-"));
    }
    let uid = part.strip_prefix("pod")?;
    is_uid(uid).then(|| uid.to_string())
}

fn systemd_scope(part: &str) -> Option<(Runtime, &str)> {
    let name = part.strip_suffix(".scope")?;
    let (runtime, id) = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::Crio),
        ("docker-", Runtime::Docker),
        ("libpod-", Runtime::Podman),
    ]
    .into_iter()
    .find_map(|(prefix, runtime)| name.strip_prefix(prefix).map(|id| (runtime, id)))?;
    is_container_id(id).then_some((runtime, id))
}

fn cgroupfs_leaf(part: &str) -> Option<(Runtime, &str)> {
    if let Some(id) = part.strip_prefix("crio-") {
        return is_container_id(id).then_some((Runtime::Crio, id));
    }
    is_container_id(part).then_some((Runtime::Unknown, part))
}

/// `ctr run` puts containers at `/<namespace>/<id>`: two components, neither a systemd unit.
fn plain_containerd(parts: &[&str]) -> Option<ContainerRef> {
    let [namespace, id] = parts else { return None };
    let unit = |p: &str| {
        [".slice", ".scope", ".service", ".mount"]
            .iter()
            .any(|s| p.ends_with(s))
    };
    if unit(namespace) || unit(id) || *namespace == "kubepods" {
        return None;
    }
    Some(ContainerRef {
        runtime: Runtime::Containerd,
        container_id: id.to_string(),
        pod_uid: None,
        namespace: Some(namespace.to_string()),
        driver: CgroupDriver::Cgroupfs,
    })
}

/// Container ids are 64 lowercase hex digits for containerd, CRI-O, docker and podman.
fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A UUID in its 8-4-4-4-12 form (Kubernetes pod UIDs).
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a5b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
    const UID: &str = "0f9c1c6e-7d3b-4a8e-9a52-1c2d3e4f5a6b";

    fn parsed(path: &str) -> ContainerRef {
        parse_cgroup_path(path).unwrap_or_else(|| panic!("no container in {path}"))
    }

    #[test]
    fn cgroupfs_kubepods_containerd() {
        let c = parsed(&format!("/kubepods/burstable/pod{UID}/{ID}"));
        assert_eq!(c.runtime, Runtime::Unknown);
        assert_eq!(c.container_id, ID);
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.driver, CgroupDriver::Cgroupfs);
        // Guaranteed QoS pods sit right under /kubepods.
        assert_eq!(
            parsed(&format!("/kubepods/pod{UID}/{ID}"))
                .pod_uid
                .as_deref(),
            Some(UID)
        );
    }

    #[test]
    fn cgroupfs_crio_and_docker() {
        let c = parsed(&format!("/kubepods/besteffort/pod{UID}/crio-{ID}"));
        assert_eq!(
            (c.runtime, c.pod_uid.as_deref()),
            (Runtime::Crio, Some(UID))
        );
        let d = parsed(&format!("/docker/{ID}"));
        assert_eq!((d.runtime, d.pod_uid), (Runtime::Docker, None));
    }

    #[test]
    fn systemd_driver_forms() {
        let uid_ = UID.replace('-', "_");
        let base =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice");
        for (prefix, runtime) in [
            ("cri-containerd", Runtime::Containerd),
            ("crio", Runtime::Crio),
            ("docker", Runtime::Docker),
        ] {
            let c = parsed(&format!("{base}/{prefix}-{ID}.scope"));
            assert_eq!(c.runtime, runtime);
            assert_eq!(c.container_id, ID);
            assert_eq!(c.pod_uid.as_deref(), Some(UID));
            assert_eq!(c.driver, CgroupDriver::Systemd);
        }
        // Guaranteed pods: kubepods-pod<uid>.slice.
        let c = parsed(&format!(
            "/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope"
        ));
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        let c = parsed(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!((c.runtime, c.pod_uid), (Runtime::Docker, None));
    }

    #[test]
    fn sub_cgroup_of_a_container_is_attributed_to_it() {
        let c = parsed(&format!("/kubepods/pod{UID}/{ID}/init.scope"));
        assert_eq!(c.container_id, ID);
    }

    #[test]
    fn plain_containerd_namespace_and_id() {
        let c = parsed("/default/web-1");
        assert_eq!(c.runtime, Runtime::Containerd);
        assert_eq!(
            (c.namespace.as_deref(), c.container_id.as_str()),
            (Some("default"), "web-1")
        );
    }

    #[test]
    fn host_cgroups_are_not_containers() {
        for path in [
            "/",
            "/init.scope",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods/burstable",
            &format!("/kubepods/burstable/pod{UID}"),
            &format!("/kubepods/burstable/podnot-a-uid/{ID}"),
            "/kubepods/besteffort/pod/x",
            &format!("/some/where/{}", &ID[..63]),
        ] {
            assert_eq!(parse_cgroup_path(path), None, "{path}");
        }
    }

    #[test]
    fn pod_cgroups_of_both_drivers_are_told_from_their_containers() {
        let uid_ = UID.replace('-', "_");
        for (path, driver) in [
            (
                format!("/kubepods/burstable/pod{UID}"),
                CgroupDriver::Cgroupfs,
            ),
            (format!("/kubepods/pod{UID}/"), CgroupDriver::Cgroupfs),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice"
                ),
                CgroupDriver::Systemd,
            ),
        ] {
            let pod = parse_pod_cgroup(&path).unwrap_or_else(|| panic!("{path}"));
            assert_eq!((pod.uid.as_str(), pod.driver), (UID, driver), "{path}");
            assert_eq!(parse_cgroup_path(&path), None, "{path} is no container");
        }
        for path in [
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            "/kubepods/burstable".into(),
            "/kubepods/podnot-a-uid".into(),
            "/".into(),
            String::new(),
        ] {
            assert_eq!(parse_pod_cgroup(&path), None, "{path}");
        }
    }

    #[test]
    fn hostile_paths_do_not_panic() {
        for path in [
            "",
            "//",
            "/.scope",
            "/-pod.slice/x",
            "/cri-containerd-.scope",
            "pod",
            "\0",
        ] {
            let _ = parse_cgroup_path(path);
        }
    }
}
