//! Reading the configuration the control plane serves: the files of a folder (the walk and
//! loader `warden check -f` uses) or texts handed over in memory (`warden demo`'s steps),
//! validated as a whole. A set with any error is refused with every reason, each naming
//! file:line, resource and field; the caller keeps serving the last good one.
//!
//! Also turns an accepted set into [`Entry`]s, inlining fetched JWKS documents into the
//! RequestAuthentications whose keys come from a `jwksUri` or OIDC discovery.
//!
//! A [`ParseCache`] keeps, per file, the documents parsed from its text and the body each
//! becomes on the wire, so a reload re-parses and re-serializes only the files whose text
//! changed (in a mesh of 10,000 policies a change is one file; parsing and serializing every
//! file again dominated the cost of a push). Validation still runs over the whole set: a
//! change in one file can break a reference from another.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use warden_policy::config::{Config, Loader};
use warden_policy::source::{parse_documents, Document};

use crate::snapshot::{classify, expand_lists, Entry, Key, Layer, MESH_OVERRIDE_KEY};

/// A configuration that loaded and validated.
pub struct Loaded {
    pub config: Arc<Config>,
    /// The resources proxies receive, in load order.
    pub resources: Vec<Prepared>,
    /// The `--mesh` file: name and text.
    pub mesh: Option<(String, String)>,
    /// Where it came from, for logs.
    pub origin: String,
}

/// One document as proxies receive it (before JWKS inlining).
#[derive(Clone)]
pub struct Prepared {
    pub key: Key,
    pub layer: Layer,
    /// The document as JSON.
    pub body: Bytes,
    /// RequestAuthentications keep their document: fetched JWKS are inlined into it.
    jwks_target: Option<Arc<Value>>,
}

/// One file's text and what it parsed into (`None`: a syntax error, which the loader reports
/// with its line).
struct CachedFile {
    /// SHA-256 of the text: what decides that a file is unchanged, without keeping the text.
    digest: [u8; 32],
    parsed: Option<Arc<ParsedFile>>,
}

struct ParsedFile {
    /// Every document, `kind: List` expanded, as JSON with its place (file, field lines) but
    /// without its tree: a parsed tree takes about twenty times its text, so the cache keeps
    /// the compact JSON and each reload decodes it again, one document at a time.
    docs: Vec<CachedDoc>,
    /// What each document is on the wire, where a proxy needs it.
    prepared: Vec<Prepared>,
}

struct CachedDoc {
    place: Document,
    json: Bytes,
}

fn digest(text: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Parsed files by name, kept between reloads of a folder. Keyed by a digest of the whole text
/// (not its size and modification time) so that a rewrite within the clock's resolution is
/// never mistaken for no change.
#[derive(Default)]
pub struct ParseCache {
    files: HashMap<String, CachedFile>,
}

impl ParseCache {
    fn parse(&mut self, file: &str, text: String) -> (Option<Arc<ParsedFile>>, String) {
        if let Some(c) = self.files.get(file) {
            if c.digest == digest(&text) {
                return (c.parsed.clone(), text);
            }
        }
        let parsed = parse_documents(file, &text).ok().map(|parsed| {
            let mut docs = Vec::new();
            for d in parsed {
                expand_lists(d, &mut docs);
            }
            let mut cached = Vec::with_capacity(docs.len());
            let mut prepared = Vec::new();
            for d in docs {
                let Ok(json) = serde_json::to_vec(&d.value) else {
                    continue;
                };
                let json = Bytes::from(json);
                prepared.extend(prepare(&d, &json));
                cached.push(CachedDoc {
                    place: d.without_value(),
                    json,
                });
            }
            Arc::new(ParsedFile {
                docs: cached,
                prepared,
            })
        });
        self.files.insert(
            file.to_string(),
            CachedFile {
                digest: digest(&text),
                parsed: parsed.clone(),
            },
        );
        (parsed, text)
    }

    /// Forgets files not in `keep` (removed from the folder).
    fn retain(&mut self, keep: &[String]) {
        let keep: std::collections::HashSet<&str> = keep.iter().map(String::as_str).collect();
        self.files.retain(|f, _| keep.contains(f.as_str()));
    }
}

fn prepare(d: &Document, json: &Bytes) -> Option<Prepared> {
    let (key, layer) = classify(d)?;
    let jwks_target = key
        .starts_with("RequestAuthentication/")
        .then(|| Arc::new(d.value.clone()));
    Some(Prepared {
        key,
        layer,
        body: json.clone(),
        jwks_target,
    })
}

/// Reads and validates every file under `paths` (and the MeshConfig file `mesh`).
pub fn load_folder(paths: &[PathBuf], mesh: Option<&Path>) -> Result<Loaded, Vec<String>> {
    load_folder_cached(paths, mesh, &mut ParseCache::default())
}

/// [`load_folder`], re-parsing only the files whose text is not in `cache`.
pub fn load_folder_cached(
    paths: &[PathBuf],
    mesh: Option<&Path>,
    cache: &mut ParseCache,
) -> Result<Loaded, Vec<String>> {
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
    let names: Vec<String> = texts.iter().map(|(f, _)| f.clone()).collect();
    let result = load_with(texts, mesh, origin, cache);
    cache.retain(&names);
    result
}

/// Loads and validates `(file name, text)` pairs.
pub fn load_texts(
    texts: &[(String, String)],
    mesh: Option<(String, String)>,
    origin: String,
) -> Result<Loaded, Vec<String>> {
    load_with(texts.to_vec(), mesh, origin, &mut ParseCache::default())
}

fn load_with(
    texts: Vec<(String, String)>,
    mesh: Option<(String, String)>,
    origin: String,
    cache: &mut ParseCache,
) -> Result<Loaded, Vec<String>> {
    let mut loader = Loader::new();
    let mut resources = Vec::new();
    for (file, text) in texts {
        match cache.parse(&file, text) {
            (Some(parsed), _) => {
                for d in &parsed.docs {
                    // Our own serialization of a parsed document: it always reads back.
                    let value = serde_json::from_slice(&d.json).unwrap_or(Value::Null);
                    loader.add_shared_document(Arc::new(d.place.with_value(value)));
                }
                resources.extend(parsed.prepared.iter().cloned());
            }
            // The loader reports it with its line.
            (None, text) => loader.add_text(&file, &text),
        }
    }
    if let Some((file, text)) = &mesh {
        loader.set_mesh_text(file, text);
    }
    // The loader takes the last mesh configuration it reads; proxies rebuild from resources
    // in another order, so two in one folder could give them another mesh (root namespace,
    // trust domain) than the control plane's. One is required.
    let mesh_docs: Vec<&Prepared> = resources
        .iter()
        .filter(|p| p.key.starts_with("MeshConfig//") || &*p.key == "ConfigMap/istio-system/istio")
        .collect();
    if mesh_docs.len() > 1 {
        let names: Vec<String> = mesh_docs
            .iter()
            .map(|p| p.key.trim_start_matches("MeshConfig//").to_string())
            .collect();
        return Err(vec![format!(
            "the mesh configuration is defined more than once ({}); keep one",
            names.join(", ")
        )]);
    }
    let (cfg, diags) = loader.finish();
    let validation = warden_policy::validate::validate(&cfg);
    let errors: Vec<String> = diags
        .iter()
        .chain(validation.iter())
        .filter(|d| d.is_error())
        .map(|d| d.to_string())
        .collect();
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Loaded {
        config: Arc::new(cfg),
        resources,
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
        let mut out = Vec::with_capacity(self.resources.len() + 1);
        for p in &self.resources {
            let body = match &p.jwks_target {
                Some(doc) if !jwks.is_empty() => {
                    let mut v = Value::clone(doc);
                    inline_jwks(&mut v, jwks);
                    match serde_json::to_vec(&v) {
                        Ok(b) => Bytes::from(b),
                        Err(_) => continue,
                    }
                }
                _ => p.body.clone(),
            };
            out.push(Entry {
                key: p.key.clone(),
                layer: p.layer,
                body,
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

    /// Regression: two mesh configurations in one folder were both accepted; proxies,
    /// rebuilding in another order, could pick the other one's root namespace.
    #[test]
    fn two_mesh_configurations_are_refused() {
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: istio-system\ndata:\n  mesh: |\n    rootNamespace: istio-system\n";
        let bare = "rootNamespace: a\n";
        let errs = load_texts(
            &texts(&[("00-mesh.yaml", bare), ("10-cm.yaml", cm)]),
            None,
            "t".into(),
        )
        .err()
        .expect("refused");
        assert!(errs[0].contains("more than once"), "{errs:?}");
        assert!(errs[0].contains("00-mesh.yaml"), "{errs:?}");
        // One is fine.
        assert!(load_texts(&texts(&[("10-cm.yaml", cm)]), None, "t".into()).is_ok());
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
