//! Reading Kubernetes manifests: multi-document YAML or JSON, `List` kinds
//! accepted. A document that does not parse is reported with its file and
//! line, and the rest of the file still applies.

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use serde::Deserialize as _;

use crate::crd;

/// One object the agent cares about.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    NetworkPolicy(Box<NetworkPolicy>),
    Node(Box<Node>),
    ClusterNetworkPolicy(Box<crd::ClusterNetworkPolicy>),
}

/// A document that could not be read, with where it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct ManifestError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

/// Parse one file's text. Returns the objects of every good document and an
/// error for every bad one.
pub fn parse(file: &Path, text: &str) -> (Vec<Object>, Vec<ManifestError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    let is_json =
        file.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    if is_json {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => match serde_json::from_value::<serde_yaml::Value>(v) {
                Ok(v) => collect(file, 1, v, &mut objects, &mut errors),
                Err(e) => errors.push(err(file, 1, e.to_string())),
            },
            Err(e) => errors.push(err(file, e.line(), e.to_string())),
        }
        return (objects, errors);
    }
    let starts = document_start_lines(text);
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let start = starts.get(i).copied().unwrap_or(1);
        match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(v) => collect(file, start, v, &mut objects, &mut errors),
            Err(e) => {
                let line = e.location().map(|l| l.line()).unwrap_or(start);
                errors.push(err(file, line, e.to_string()));
                // serde_yaml stops at a syntax error; nothing after it can be
                // trusted to be split correctly.
                break;
            }
        }
    }
    (objects, errors)
}

fn err(file: &Path, line: usize, message: String) -> ManifestError {
    ManifestError {
        file: file.to_path_buf(),
        line,
        message,
    }
}

/// First line (1-based) of each YAML document.
fn document_start_lines(text: &str) -> Vec<usize> {
    let mut starts = vec![1];
    for (i, l) in text.lines().enumerate() {
        if l.starts_with("---") {
            if i == 0 {
                continue;
            }
            starts.push(i + 2);
        }
    }
    starts
}

fn collect(
    file: &Path,
    line: usize,
    v: serde_yaml::Value,
    objects: &mut Vec<Object>,
    errors: &mut Vec<ManifestError>,
) {
    let kind = v
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let name = v
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<no name>")
        .to_string();
    let typed = |r: Result<Object, serde_yaml::Error>| {
        r.map_err(|e| err(file, line, format!("{kind} {name}: {e}")))
    };
    let res = match kind.as_str() {
        "Namespace" => typed(serde_yaml::from_value(v).map(|o| Object::Namespace(Box::new(o)))),
        "Pod" => typed(serde_yaml::from_value(v).map(|o| Object::Pod(Box::new(o)))),
        "NetworkPolicy" => {
            typed(serde_yaml::from_value(v).map(|o| Object::NetworkPolicy(Box::new(o))))
        }
        "Node" => typed(serde_yaml::from_value(v).map(|o| Object::Node(Box::new(o)))),
        "ClusterNetworkPolicy" => {
            let api_version = v.get("apiVersion").and_then(|a| a.as_str()).unwrap_or("");
            if api_version == <crd::ClusterNetworkPolicy as k8s_openapi::Resource>::API_VERSION {
                typed(serde_yaml::from_value(v).map(|o| Object::ClusterNetworkPolicy(Box::new(o))))
            } else {
                Err(err(
                    file,
                    line,
                    format!(
                        "{kind} {name}: apiVersion {api_version:?} is not supported (want policy.networking.k8s.io/v1alpha2)"
                    ),
                ))
            }
        }
        k if k.ends_with("List") => {
            match v.get("items").and_then(|i| i.as_sequence()) {
                Some(items) => {
                    for item in items.clone() {
                        collect(file, line, item, objects, errors);
                    }
                }
                None => errors.push(err(file, line, format!("{k} without items"))),
            }
            return;
        }
        "" => Err(err(file, line, "document has no kind".into())),
        other => {
            tracing::debug!(file = %file.display(), kind = other, "ignoring object kind");
            return;
        }
    };
    match res {
        Ok(o) => objects.push(o),
        Err(e) => errors.push(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_with_a_bad_document_keeps_the_good_ones() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  namespace: x\nspec:\n  containers: 7\n---\n\
                    apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: x\nspec:\n  podSelector: {}\n";
        let (objs, errs) = parse(Path::new("m.yaml"), text);
        assert_eq!(objs.len(), 2, "namespace and policy survive");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 6, "the pod document starts on line 6");
        assert!(errs[0].message.contains("Pod a"), "{}", errs[0].message);
        assert!(errs[0].to_string().starts_with("m.yaml:6:"));
    }

    #[test]
    fn list_kinds_and_json() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"x"}},
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"y"}}]}"#;
        let (objs, errs) = parse(Path::new("l.json"), text);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(objs.len(), 2);
    }

    #[test]
    fn cluster_network_policies_are_read_in_v1alpha2_only() {
        let text = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n\
                    metadata:\n  name: deny-metadata\nspec:\n  tier: Admin\n  priority: 1\n\
                    ---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: ClusterNetworkPolicy\n\
                    metadata:\n  name: old\n";
        let (objs, errs) = parse(Path::new("cnp.yaml"), text);
        assert_eq!(objs.len(), 1, "{errs:?}");
        let Object::ClusterNetworkPolicy(cnp) = &objs[0] else {
            panic!("{:?}", objs[0]);
        };
        assert_eq!(cnp.metadata.name.as_deref(), Some("deny-metadata"));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 9);
        assert!(errs[0].message.contains("v1alpha1"), "{}", errs[0].message);
    }

    #[test]
    fn syntax_error_names_the_line() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: [x\n";
        let (objs, errs) = parse(Path::new("bad.yaml"), text);
        assert!(objs.is_empty());
        assert_eq!(errs.len(), 1);
        assert!(errs[0].line >= 4, "{errs:?}");
    }
}
