//! Reading the configuration the control plane serves: the files of a folder (the walk and
//! loader `warden check -f` uses) or texts handed over in memory (`warden demo`'s steps),
//! validated as a whole. A set with any error is refused with every reason, each naming
//! file:line, resource and field; the caller keeps serving the last good one.
//!
//! Also turns an accepted set into [`Entry`]s, inlining fetched JWKS documents into the
//! RequestAuthentications whose keys come from a `jwksUri` or OIDC discovery.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use warden_policy::config::{Config, Loader};
use warden_policy::source::{parse_documents, Document};

use crate::snapshot::{classify, expand_lists, Entry, Layer, MESH_OVERRIDE_KEY};

/// A configuration that loaded and validated.
pub struct Loaded {
    pub config: Arc<Config>,
    /// Every document, `kind: List` expanded, in load order.
    pub docs: Vec<Document>,
    /// The `--mesh` file: name and text.
    pub mesh: Option<(String, String)>,
    /// Where it came from, for logs.
    pub origin: String,
}

/// Reads and validates every file under `paths` (and the MeshConfig file `mesh`).
pub fn load_folder(paths: &[PathBuf], mesh: Option<&Path>) -> Result<Loaded, Vec<String>> {
    let files = warden_proxy::source::collect_all(paths).map_err(|e| vec![e])?;
    let mut texts = Vec::with_capacity(files.len());
    for f in &files {
        match std::fs::read_to_string(f) {
            Ok(text) => texts.push((f.display().to_string(), text)),
            Err(e) => return Err(vec![format!("{}: cannot read: {e}", f.display())]),
        }
    }
    let mesh = match mesh {
        Some(m) => match std::fs::read_to_string(m) {
            Ok(text) => Some((m.display().to_string(), text)),
            Err(e) => {
                return Err(vec![format!(
                    "{}: cannot read mesh config: {e}",
                    m.display()
                )])
            }
        },
        None => None,
    };
    let origin = format!(
        "{} ({} file(s))",
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        files.len()
    );
    load_texts(&texts, mesh, origin)
}

/// Loads and validates `(file name, text)` pairs.
pub fn load_texts(
    texts: &[(String, String)],
    mesh: Option<(String, String)>,
    origin: String,
) -> Result<Loaded, Vec<String>> {
    let mut loader = Loader::new();
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (file, text) in texts {
        match parse_documents(file, text) {
            Ok(parsed) => {
                for d in parsed {
                    expand_lists(d, &mut docs);
                }
            }
            // The loader reports it with its line.
            Err(_) => loader.add_text(file, text),
        }
    }
    for d in &docs {
        loader.add_document(d.clone());
    }
    if let Some((file, text)) = &mesh {
        loader.set_mesh_text(file, text);
    }
    let (cfg, diags) = loader.finish();
    let validation = warden_policy::validate::validate(&cfg);
    errors.extend(
        diags
            .iter()
            .chain(validation.iter())
            .filter(|d| d.is_error())
            .map(|d| d.to_string()),
    );
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Loaded {
        config: Arc::new(cfg),
        docs,
        mesh,
        origin,
    })
}

impl Loaded {
    /// The resources of this configuration, with fetched JWKS documents (by
    /// [`crate::jwks::target_key`]) inlined into the RequestAuthentications that need them.
    /// A rule whose keys were never fetched keeps its `jwksUri`: the proxy has no keys for it
    /// and refuses its tokens (fail closed).
    pub fn entries(&self, jwks: &BTreeMap<String, String>) -> Vec<Entry> {
        let mut out = Vec::with_capacity(self.docs.len() + 1);
        for d in &self.docs {
            let Some((key, layer)) = classify(d) else {
                continue;
            };
            let body = if key.starts_with("RequestAuthentication/") && !jwks.is_empty() {
                let mut v = d.value.clone();
                inline_jwks(&mut v, jwks);
                serde_json::to_vec(&v)
            } else {
                serde_json::to_vec(&d.value)
            };
            let Ok(body) = body else { continue };
            out.push(Entry {
                key,
                layer,
                body: Bytes::from(body),
            });
        }
        if let Some((_, text)) = &self.mesh {
            out.push(Entry {
                key: MESH_OVERRIDE_KEY.into(),
                layer: Layer::Global,
                body: Bytes::from(text.clone().into_bytes()),
            });
        }
        out
    }
}

/// Puts each fetched JWKS in place of the `jwksUri` (or discovery) of the rules that name it.
/// Validation allows only one of `jwks` and `jwksUri`, so the URI goes.
fn inline_jwks(doc: &mut Value, jwks: &BTreeMap<String, String>) {
    let Some(rules) = doc
        .get_mut("spec")
        .and_then(|s| s.get_mut("jwtRules"))
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for rule in rules {
        let Some(obj) = rule.as_object_mut() else {
            continue;
        };
        let has_inline = obj
            .get("jwks")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty());
        if has_inline {
            continue;
        }
        let uri = obj.get("jwksUri").and_then(Value::as_str).unwrap_or("");
        let target = if !uri.is_empty() {
            uri.to_string()
        } else {
            match obj.get("issuer").and_then(Value::as_str) {
                Some(i) if !i.is_empty() => format!("discovery:{i}"),
                _ => continue,
            }
        };
        if let Some(text) = jwks.get(&target) {
            obj.remove("jwksUri");
            obj.insert("jwks".into(), Value::String(text.clone()));
        }
    }
}

/// The JWKS targets (by [`crate::jwks::target_key`]) the configuration's rules need.
pub fn jwks_targets(cfg: &Config) -> Vec<String> {
    let mut v: Vec<String> = cfg
        .request_authentications
        .iter()
        .flat_map(|p| p.spec.jwt_rules.iter().flatten())
        .filter_map(crate::jwks::target_key)
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(f, t)| (f.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn a_bad_file_is_refused_with_file_line_and_resource() {
        let bad = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: foo\nspec:\n  action: MAYBE\n";
        let errs = load_texts(&texts(&[("a.yaml", bad)]), None, "t".into())
            .err()
            .expect("refused");
        let all = errs.join("\n");
        assert!(all.contains("a.yaml:"), "{all}");
        assert!(all.contains("AuthorizationPolicy foo/p"), "{all}");
    }

    #[test]
    fn jwks_documents_replace_the_uri() {
        let ra = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\n  namespace: foo\nspec:\n  jwtRules:\n  - issuer: https://issuer\n    jwksUri: https://issuer/keys\n  - issuer: https://other\n    jwksUri: https://other/keys\n";
        let loaded = load_texts(&texts(&[("ra.yaml", ra)]), None, "t".into()).expect("loads");
        let mut jwks = BTreeMap::new();
        jwks.insert(
            "https://issuer/keys".to_string(),
            "{\"keys\":[]}".to_string(),
        );
        let entries = loaded.entries(&jwks);
        assert_eq!(entries.len(), 1);
        let v: Value = serde_json::from_slice(&entries[0].body).expect("json");
        let rules = v["spec"]["jwtRules"].as_array().expect("rules");
        assert_eq!(rules[0]["jwks"], "{\"keys\":[]}");
        assert!(rules[0].get("jwksUri").is_none());
        // Never fetched: the URI stays, and the proxy fails closed on it.
        assert_eq!(rules[1]["jwksUri"], "https://other/keys");
        assert!(rules[1].get("jwks").is_none());
    }
}
