//! ListPodSandbox / ListContainers filters, exactly as the CRI defines them: every set
//! field must match; ids may be unique prefixes; a label selector matches when every
//! key/value pair is among the object's labels.

use std::collections::HashMap;

use isola_proto::cri;

use super::CriError;
use crate::ids::Resolved;
use crate::records::{ContainerRecord, Records, SandboxRecord};

/// Validates a label selector's keys and values with the Kubernetes label syntax.
pub fn validate_selector(field: &str, selector: &HashMap<String, String>) -> Result<(), CriError> {
    for (k, v) in selector {
        if let Err(why) = check_label_key(k) {
            return Err(CriError::InvalidArgument(format!(
                "{field}: invalid label key {k:?}: {why}"
            )));
        }
        if let Err(why) = check_label_value(v) {
            return Err(CriError::InvalidArgument(format!(
                "{field}: invalid value {v:?} for label {k:?}: {why}"
            )));
        }
    }
    Ok(())
}

fn check_name_part(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("name part must not be empty");
    }
    if s.len() > 63 {
        return Err("name part must be at most 63 characters");
    }
    let b = s.as_bytes();
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err("must begin and end with an alphanumeric character");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err("may contain only alphanumerics, '-', '_' and '.'");
    }
    Ok(())
}

fn check_label_key(key: &str) -> Result<(), &'static str> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() || prefix.len() > 253 {
                return Err("prefix must be a DNS subdomain of 1 to 253 characters");
            }
            if !prefix.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            }) {
                return Err("prefix must be a lowercase DNS subdomain");
            }
            name
        }
        None => key,
    };
    check_name_part(name)
}

fn check_label_value(v: &str) -> Result<(), &'static str> {
    if v.is_empty() {
        return Ok(());
    }
    check_name_part(v)
}

fn labels_match(selector: &HashMap<String, String>, labels: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// An id filter resolved against the records: `None` means no filter, `Some(None)` means
/// it names nothing (so nothing matches).
fn resolve_filter_id(id: &str, resolved: impl FnOnce(&str) -> Resolved) -> Option<Option<String>> {
    if id.is_empty() {
        return None;
    }
    match resolved(id) {
        Resolved::One(full) => Some(Some(full)),
        Resolved::None | Resolved::Ambiguous(_) => Some(None),
    }
}

/// Applies a PodSandboxFilter.
pub fn filter_sandboxes(
    records: &Records,
    filter: Option<&cri::PodSandboxFilter>,
) -> Result<Vec<SandboxRecord>, CriError> {
    let mut all = records.sandboxes();
    all.sort_by(|a, b| b.created_at_ns.cmp(&a.created_at_ns).then(a.id.cmp(&b.id)));
    let Some(f) = filter else { return Ok(all) };
    validate_selector("filter.label_selector", &f.label_selector)?;
    let id = resolve_filter_id(&f.id, |p| records.resolve_sandbox(p));
    let state = f.state.as_ref().map(|s| s.state);
    Ok(all
        .into_iter()
        .filter(|s| match &id {
            None => true,
            Some(None) => false,
            Some(Some(full)) => &s.id == full,
        })
        .filter(|s| state.is_none_or(|st| s.state.to_cri() as i32 == st))
        .filter(|s| labels_match(&f.label_selector, &s.config.labels))
        .collect())
}

/// Applies a ContainerFilter.
pub fn filter_containers(
    records: &Records,
    filter: Option<&cri::ContainerFilter>,
) -> Result<Vec<ContainerRecord>, CriError> {
    let mut all = records.containers();
    all.sort_by(|a, b| b.created_at_ns.cmp(&a.created_at_ns).then(a.id.cmp(&b.id)));
    let Some(f) = filter else { return Ok(all) };
    validate_selector("filter.label_selector", &f.label_selector)?;
    let id = resolve_filter_id(&f.id, |p| records.resolve_container(p));
    let pod = resolve_filter_id(&f.pod_sandbox_id, |p| records.resolve_sandbox(p));
    let state = f.state.as_ref().map(|s| s.state);
    Ok(all
        .into_iter()
        .filter(|c| match &id {
            None => true,
            Some(None) => false,
            Some(Some(full)) => &c.id == full,
        })
        .filter(|c| match &pod {
            None => true,
            Some(None) => false,
            Some(Some(full)) => &c.sandbox_id == full,
        })
        .filter(|c| state.is_none_or(|st| c.state.to_cri() as i32 == st))
        .filter(|c| labels_match(&f.label_selector, &c.config.labels))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classes::ShimKind;
    use crate::records::{ContainerState, SandboxState};

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sb(id: &str, state: SandboxState, l: &[(&str, &str)]) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            config: cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: id.into(),
                    namespace: "ns".into(),
                    uid: id.into(),
                    attempt: 0,
                }),
                labels: labels(l),
                ..Default::default()
            },
            runtime_handler: "native".into(),
            shim_kind: ShimKind::Native,
            state,
            reason: String::new(),
            created_at_ns: 0,
            shim: None,
            netns_path: String::new(),
            ip: String::new(),
            additional_ips: vec![],
            info: Default::default(),
        }
    }

    fn ct(id: &str, pod: &str, state: ContainerState, l: &[(&str, &str)]) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            sandbox_id: pod.into(),
            config: cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: id.into(),
                    attempt: 0,
                }),
                labels: labels(l),
                ..Default::default()
            },
            image_ref: String::new(),
            image_id: String::new(),
            state,
            created_at_ns: 0,
            started_at_ns: 0,
            finished_at_ns: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            log_path: String::new(),
            cgroup_path: String::new(),
            pid: 0,
        }
    }

    fn ids<T>(v: Vec<T>, f: impl Fn(&T) -> &str) -> Vec<String> {
        let mut out: Vec<String> = v.iter().map(|x| f(x).to_string()).collect();
        out.sort();
        out
    }

    /// The container filter logic over real records (the end-to-end tests cover the same
    /// filters through the socket once containers can run).
    #[tokio::test]
    async fn container_filters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Records::open(&dir.path().join("db")).expect("open");
        r.put_sandbox(sb("p1aaaa", SandboxState::Ready, &[]))
            .await
            .expect("put");
        r.put_sandbox(sb("p2bbbb", SandboxState::Ready, &[]))
            .await
            .expect("put");
        for c in [
            ct(
                "c1aaaa",
                "p1aaaa",
                ContainerState::Running,
                &[("app", "web")],
            ),
            ct("c1abbb", "p1aaaa", ContainerState::Exited, &[("app", "db")]),
            ct(
                "c2cccc",
                "p2bbbb",
                ContainerState::Running,
                &[("app", "web"), ("tier", "1")],
            ),
            ct("c3dddd", "p2bbbb", ContainerState::Created, &[]),
        ] {
            r.put_container(c).await.expect("put");
        }
        let get = |f: cri::ContainerFilter| {
            ids(filter_containers(&r, Some(&f)).expect("filter"), |c| &c.id)
        };
        assert_eq!(filter_containers(&r, None).expect("all").len(), 4);
        assert_eq!(
            get(cri::ContainerFilter {
                id: "c2".into(),
                ..Default::default()
            }),
            vec!["c2cccc"]
        );
        // An ambiguous or unknown prefix matches nothing.
        assert!(get(cri::ContainerFilter {
            id: "c1".into(),
            ..Default::default()
        })
        .is_empty());
        assert!(get(cri::ContainerFilter {
            id: "zz".into(),
            ..Default::default()
        })
        .is_empty());
        assert_eq!(
            get(cri::ContainerFilter {
                pod_sandbox_id: "p2".into(),
                ..Default::default()
            }),
            vec!["c2cccc", "c3dddd"]
        );
        assert_eq!(
            get(cri::ContainerFilter {
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32
                }),
                ..Default::default()
            }),
            vec!["c1aaaa", "c2cccc"]
        );
        assert_eq!(
            get(cri::ContainerFilter {
                label_selector: labels(&[("app", "web")]),
                ..Default::default()
            }),
            vec!["c1aaaa", "c2cccc"]
        );
        assert_eq!(
            get(cri::ContainerFilter {
                label_selector: labels(&[("app", "web"), ("tier", "1")]),
                pod_sandbox_id: "p2bbbb".into(),
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32
                }),
                ..Default::default()
            }),
            vec!["c2cccc"]
        );
        assert!(get(cri::ContainerFilter {
            label_selector: labels(&[("app", "web")]),
            pod_sandbox_id: "p1".into(),
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerExited as i32
            }),
            ..Default::default()
        })
        .is_empty());
        let bad = cri::ContainerFilter {
            label_selector: labels(&[("bad key!", "x")]),
            ..Default::default()
        };
        assert!(matches!(
            filter_containers(&r, Some(&bad)),
            Err(CriError::InvalidArgument(_))
        ));
    }

    #[test]
    fn label_syntax() {
        assert!(check_label_key("app").is_ok());
        assert!(check_label_key("io.kubernetes.pod/name").is_ok());
        assert!(check_label_key("example.com/a_b-c.d").is_ok());
        assert!(check_label_key("").is_err());
        assert!(check_label_key("/x").is_err());
        assert!(check_label_key("a b").is_err());
        assert!(check_label_key(&"a".repeat(64)).is_err());
        assert!(check_label_key("Upper.Case/x").is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("-x").is_err());
    }
}
