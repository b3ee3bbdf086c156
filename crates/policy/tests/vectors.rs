//! The semantics spec's test vectors (§9a of istio-security-semantics.md), one table row each,
//! run against the engine the proxy enforces with.

use base64::Engine as _;
use warden_policy::authz::Protocol;
use warden_policy::config::{Config, Loader};
use warden_policy::engine::{HttpRequest, InlineJwksOnly, Request, WorkloadPolicy};
use warden_policy::model::MtlsMode;
use warden_policy::scope;

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: foo}
spec:
  template:
    metadata: {labels: {app: server}}
    spec:
      serviceAccountName: server
      containers: [{name: s, ports: [{containerPort: 8080}, {containerPort: 9090}]}]
"#;

const SECRET: &[u8] = b"warden-vectors-test-secret-0123456789";
const NOW: i64 = 1_780_272_000;

fn jwks() -> String {
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
    format!(r#"{{"keys":[{{"kty":"oct","alg":"HS256","kid":"k1","k":"{k}"}}]}}"#)
}

fn token(claims: serde_json::Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("k1".into());
    jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET)).unwrap()
}

fn config(extra: &str) -> Config {
    let mut l = Loader::new();
    l.add_text("vectors.yaml", &format!("{BASE}\n---\n{extra}"));
    let (cfg, diags) = l.finish();
    assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
    cfg
}

struct Req<'a> {
    peer: Option<&'a str>,
    port: u16,
    /// `None` = TCP connection.
    http: Option<(&'a str, &'a str, &'a str)>,
    headers: Vec<(&'a str, String)>,
}

fn http(method: &'static str, path: &'static str) -> Req<'static> {
    Req {
        peer: Some("spiffe://cluster.local/ns/a/sa/b"),
        port: 8080,
        http: Some((method, path, "server.foo:8080")),
        headers: Vec::new(),
    }
}

/// Outcome string (`allow`, `deny`, `unauthenticated`, `reset`) plus the HTTP body.
fn run(cfg: &Config, r: &Req<'_>) -> (String, String) {
    let wl = cfg.workload("foo", "server").unwrap();
    let p = WorkloadPolicy::compile(cfg, wl, &InlineJwksOnly);
    let headers: Vec<(&str, &str)> = r.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let req = Request {
        destination_port: r.port,
        peer: r.peer,
        http: r.http.map(|(m, t, h)| HttpRequest {
            method: m,
            authority: h,
            target: t,
            headers: &headers,
        }),
        ..Default::default()
    };
    let proto = if r.http.is_some() {
        Protocol::Http
    } else {
        Protocol::Tcp
    };
    let d = p.evaluate(&req, proto, NOW, &mut |_, _| None).unwrap();
    (d.outcome.as_str().to_string(), d.body)
}

fn ap(name: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: {action}\n{rules}\n---\n"
    )
}

fn ra(issuer: &str, extra: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  jwtRules:\n  - issuer: {issuer}\n    jwks: '{}'\n{extra}\n---\n",
        jwks()
    )
}

#[test]
fn v01_allow_nothing() {
    let cfg = config(&ap("none", "ALLOW", ""));
    assert_eq!(run(&cfg, &http("GET", "/")).0, "deny");
}

#[test]
fn v02_query_is_ignored_by_paths() {
    let cfg = config(&format!(
        "{}{}",
        ap("all", "ALLOW", "  rules: [{}]"),
        ap(
            "deny",
            "DENY",
            "  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]"
        )
    ));
    assert_eq!(
        run(&cfg, &http("GET", "/admin?x=1")),
        ("deny".into(), "RBAC: access denied".into())
    );
    assert_eq!(run(&cfg, &http("GET", "/public")).0, "allow");
}

#[test]
fn v03_merge_slashes() {
    let deny = ap(
        "deny",
        "DENY",
        "  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]",
    );
    assert_eq!(run(&config(&deny), &http("GET", "//admin")).0, "allow");
    let mesh = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    pathNormalization: {normalization: MERGE_SLASHES}\n---\n";
    assert_eq!(
        run(&config(&format!("{mesh}{deny}")), &http("GET", "//admin")).0,
        "deny"
    );
}

#[test]
fn v04_fragment_is_stripped() {
    let cfg = config(&ap(
        "deny",
        "DENY",
        "  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]",
    ));
    assert_eq!(run(&cfg, &http("GET", "/admin#frag")).0, "deny");
}

#[test]
fn v05_trust_domain_rewrite() {
    let mesh = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    trustDomain: td1\n---\n";
    let cfg = config(&format!(
        "{mesh}{}",
        ap(
            "p",
            "ALLOW",
            "  rules: [{from: [{source: {principals: [\"cluster.local/ns/a/sa/b\"]}}]}]"
        )
    ));
    let mut r = http("GET", "/");
    r.peer = Some("spiffe://td1/ns/a/sa/b");
    assert_eq!(run(&cfg, &r).0, "allow");
    r.peer = Some("spiffe://cluster.local/ns/a/sa/b");
    assert_eq!(run(&cfg, &r).0, "deny");
}

#[test]
fn v06_v07_identity_fields_on_plaintext() {
    let cfg = config(&ap(
        "p",
        "ALLOW",
        "  rules: [{from: [{source: {principals: [\"*\"]}}]}]",
    ));
    let mut r = http("GET", "/");
    r.peer = None;
    assert_eq!(run(&cfg, &r).0, "deny");
    let cfg = config(&ap(
        "d",
        "DENY",
        "  rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]",
    ));
    assert_eq!(run(&cfg, &r).0, "deny");
    assert_eq!(run(&cfg, &http("GET", "/")).0, "allow");
}

#[test]
fn v08_allow_with_http_fields_denies_tcp() {
    let cfg = config(&ap(
        "p",
        "ALLOW",
        "  rules: [{to: [{operation: {methods: [GET]}}]}]",
    ));
    let tcp = Req {
        peer: Some("spiffe://cluster.local/ns/a/sa/b"),
        port: 9090,
        http: None,
        headers: vec![],
    };
    assert_eq!(run(&cfg, &tcp).0, "reset");
    assert_eq!(run(&cfg, &http("GET", "/")).0, "allow");
}

#[test]
fn v09_deny_with_http_fields_widens_on_tcp() {
    let cfg = config(&ap(
        "d",
        "DENY",
        "  rules: [{to: [{operation: {methods: [GET], ports: [\"8080\"]}}]}]",
    ));
    let mut tcp = Req {
        peer: Some("spiffe://cluster.local/ns/a/sa/b"),
        port: 8080,
        http: None,
        headers: vec![],
    };
    assert_eq!(run(&cfg, &tcp).0, "reset");
    tcp.port = 9090;
    assert_eq!(run(&cfg, &tcp).0, "allow");
}

#[test]
fn v10_hosts_ignore_case_but_not_port() {
    let cfg = config(&ap(
        "p",
        "ALLOW",
        "  rules: [{to: [{operation: {hosts: [example.com]}}]}]",
    ));
    let mut r = http("GET", "/");
    r.http = Some(("GET", "/", "EXAMPLE.com"));
    assert_eq!(run(&cfg, &r).0, "allow");
    r.http = Some(("GET", "/", "example.com:80"));
    assert_eq!(run(&cfg, &r).0, "deny");
}

#[test]
fn v11_request_principals_need_iss_and_sub() {
    let cfg = config(&format!(
        "{}{}",
        ra("iss1", ""),
        ap(
            "p",
            "ALLOW",
            "  rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]"
        )
    ));
    assert_eq!(
        run(&cfg, &http("GET", "/")),
        ("deny".into(), "RBAC: access denied".into())
    );
    let mut r = http("GET", "/");
    r.headers = vec![(
        "authorization",
        format!(
            "Bearer {}",
            token(serde_json::json!({"iss": "iss1", "sub": "u"}))
        ),
    )];
    assert_eq!(run(&cfg, &r).0, "allow");
    r.headers = vec![(
        "authorization",
        format!("Bearer {}", token(serde_json::json!({"iss": "iss1"}))),
    )];
    assert_eq!(run(&cfg, &r).0, "deny");
}

#[test]
fn v12_unknown_issuer_is_401() {
    let cfg = config(&ra("A", ""));
    let mut r = http("GET", "/");
    r.headers = vec![(
        "authorization",
        format!(
            "Bearer {}",
            token(serde_json::json!({"iss": "B", "sub": "u"}))
        ),
    )];
    assert_eq!(
        run(&cfg, &r),
        (
            "unauthenticated".into(),
            "Jwt issuer is not configured".into()
        )
    );
}

#[test]
fn v13_audiences_are_sanitized() {
    let cfg = config(&ra("iss1", "    audiences: [svc]"));
    let mut r = http("GET", "/");
    r.headers = vec![(
        "authorization",
        format!(
            "Bearer {}",
            token(serde_json::json!({"iss": "iss1", "sub": "u", "aud": "https://svc/"}))
        ),
    )];
    assert_eq!(run(&cfg, &r).0, "allow");
    r.headers = vec![(
        "authorization",
        format!(
            "Bearer {}",
            token(serde_json::json!({"iss": "iss1", "sub": "u", "aud": "other"}))
        ),
    )];
    assert_eq!(
        run(&cfg, &r),
        ("deny".into(), "Audiences in Jwt are not allowed".into())
    );
}

#[test]
fn v14_basic_auth_is_no_token() {
    let cfg = config(&ra("iss1", ""));
    let mut r = http("GET", "/");
    r.headers = vec![("authorization", "Basic dXNlcjpwYXNz".into())];
    assert_eq!(run(&cfg, &r).0, "allow");
}

#[test]
fn v15_space_delimited_scope() {
    let cfg = config(&format!(
        "{}{}",
        ra("iss1", ""),
        ap(
            "p",
            "ALLOW",
            "  rules: [{when: [{key: \"request.auth.claims[scope]\", values: [write]}]}]"
        )
    ));
    let mut r = http("GET", "/");
    r.headers = vec![(
        "authorization",
        format!(
            "Bearer {}",
            token(serde_json::json!({"iss": "iss1", "sub": "u", "scope": "read write"}))
        ),
    )];
    assert_eq!(run(&cfg, &r).0, "allow");
}

#[test]
fn v16_service_accounts() {
    let cfg = config(&ap(
        "p",
        "ALLOW",
        "  rules: [{from: [{source: {serviceAccounts: [sa1]}}]}]",
    ));
    let mut r = http("GET", "/");
    r.peer = Some("spiffe://any.td/ns/foo/sa/sa1");
    assert_eq!(run(&cfg, &r).0, "allow");
    r.peer = Some("spiffe://any.td/ns/foo/sa/sa1x");
    assert_eq!(run(&cfg, &r).0, "deny");
}

#[test]
fn v17_namespace_prefix() {
    let cfg = config(&ap(
        "p",
        "ALLOW",
        "  rules: [{from: [{source: {namespaces: [\"prod*\"]}}]}]",
    ));
    let mut r = http("GET", "/");
    r.peer = Some("spiffe://td/ns/prod-eu/sa/x");
    assert_eq!(run(&cfg, &r).0, "allow");
}

fn pa(name: &str, ns: &str, body: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n---\n")
}

fn mode(cfg: &Config, port: u16) -> MtlsMode {
    let wl = cfg.workload("foo", "server").unwrap();
    scope::peer_authentication(cfg, wl).mode_for(port).mode
}

#[test]
fn v18_unset_inherits() {
    let cfg = config(&format!(
        "{}{}{}",
        pa("mesh", "istio-system", "  mtls: {mode: STRICT}"),
        pa("ns", "foo", "  mtls: {mode: PERMISSIVE}"),
        pa("wl", "foo", "  selector: {matchLabels: {app: server}}\n  mtls: {mode: UNSET}\n  portLevelMtls:\n    8080: {mode: UNSET}")
    ));
    assert_eq!(mode(&cfg, 8080), MtlsMode::Permissive);
}

#[test]
fn v19_oldest_namespace_policy_wins() {
    let cfg = config(&format!(
        "{}{}",
        pa("b-newer", "foo", "  mtls: {mode: DISABLE}").replace(
            "namespace: foo}",
            "namespace: foo, creationTimestamp: \"2026-02-01T00:00:00Z\"}"
        ),
        pa("z-older", "foo", "  mtls: {mode: STRICT}").replace(
            "namespace: foo}",
            "namespace: foo, creationTimestamp: \"2026-01-01T00:00:00Z\"}"
        )
    ));
    assert_eq!(mode(&cfg, 8080), MtlsMode::Strict);
}

#[test]
fn v20_root_namespace_selector_is_ignored() {
    let cfg = config(&pa(
        "x",
        "istio-system",
        "  selector: {matchLabels: {app: server}}\n  mtls: {mode: STRICT}",
    ));
    assert_eq!(mode(&cfg, 8080), MtlsMode::Permissive);
}

#[test]
fn repeated_headers_match_per_value() {
    let cfg = config(&ap(
        "d",
        "DENY",
        "  rules: [{when: [{key: \"request.headers[x-role]\", values: [admin]}]}]",
    ));
    let mut r = http("GET", "/");
    r.headers = vec![("x-role", "user".into()), ("x-role", "admin".into())];
    assert_eq!(run(&cfg, &r).0, "deny");
}

#[test]
fn dry_run_allow_does_not_default_deny() {
    let cfg = config(
        &ap(
            "p",
            "ALLOW",
            "  rules: [{to: [{operation: {methods: [POST]}}]}]",
        )
        .replace(
            "namespace: foo}",
            "namespace: foo, annotations: {istio.io/dry-run: \"true\"}}",
        ),
    );
    assert_eq!(run(&cfg, &http("GET", "/")).0, "allow");
}

/// Review finding: a client must not be able to spoof a claim header that a
/// RequestAuthentication writes (Envoy removes incoming copies before verification).
#[test]
fn claim_headers_cannot_be_spoofed() {
    let cfg = config(&format!(
        "{}{}",
        ra("iss1", "    outputClaimToHeaders: [{header: x-role, claim: role}]\n    outputPayloadToHeader: x-jwt-payload"),
        ap("p", "ALLOW", "  rules: [{when: [{key: \"request.headers[x-role]\", values: [admin]}]}]")
    ));
    let mut r = http("GET", "/");
    r.headers = vec![("x-role", "admin".into())];
    assert_eq!(run(&cfg, &r).0, "deny", "spoofed header without a token");
    let user = token(serde_json::json!({"iss": "iss1", "sub": "u", "role": "user"}));
    r.headers = vec![
        ("x-role", "admin".into()),
        ("authorization", format!("Bearer {user}")),
    ];
    assert_eq!(
        run(&cfg, &r).0,
        "deny",
        "spoofed header with a token whose role is user"
    );
    let admin = token(serde_json::json!({"iss": "iss1", "sub": "u", "role": "admin"}));
    r.headers = vec![("authorization", format!("Bearer {admin}"))];
    assert_eq!(
        run(&cfg, &r).0,
        "allow",
        "header written from the verified claim"
    );
}

/// The token header is gone after verification unless forwardOriginalToken; the payload
/// header carries the token's payload segment.
#[test]
fn token_header_removed_and_payload_forwarded() {
    let t = token(serde_json::json!({"iss": "iss1", "sub": "u"}));
    let payload_segment = t.split('.').nth(1).unwrap().to_string();
    let cfg = config(&format!(
        "{}{}",
        ra("iss1", "    outputPayloadToHeader: x-jwt-payload"),
        ap(
            "p",
            "ALLOW",
            &format!("  rules: [{{when: [{{key: \"request.headers[x-jwt-payload]\", values: [\"{payload_segment}\"]}}, {{key: \"request.headers[authorization]\", notValues: [\"*\"]}}]}}]")
        )
    ));
    let mut r = http("GET", "/");
    r.headers = vec![("authorization", format!("Bearer {t}"))];
    assert_eq!(run(&cfg, &r).0, "allow");
}

/// Review finding: `request.headers[:path]` sees Envoy's normalized path (query kept,
/// fragment stripped), not the path as sent.
#[test]
fn path_header_is_normalized() {
    let cfg = config(&ap(
        "d",
        "DENY",
        "  rules: [{when: [{key: \"request.headers[:path]\", values: [\"/admin*\"]}]}]",
    ));
    for p in ["/public/../admin", "/%61dmin", "/admin#x", "/admin?q=1"] {
        let mut r = http("GET", "/");
        r.http = Some(("GET", p, "server.foo:8080"));
        assert_eq!(run(&cfg, &r).0, "deny", "{p}");
    }
    assert_eq!(run(&cfg, &http("GET", "/public")).0, "allow");
}

/// Review finding: a TCP denial caused by ALLOW rules that only exist for HTTP says so, and
/// CUSTOM rules carry Envoy's ext-authz ids.
#[test]
fn explanations_name_dropped_rules_and_custom_ids() {
    let cfg = config(&ap(
        "p",
        "ALLOW",
        "  rules: [{from: [{source: {principals: [\"*\"]}}], to: [{operation: {methods: [GET]}}]}]",
    ));
    let wl = cfg.workload("foo", "server").unwrap();
    let p = WorkloadPolicy::compile(&cfg, wl, &InlineJwksOnly);
    let req = Request {
        destination_port: 9090,
        peer: Some("spiffe://cluster.local/ns/a/sa/b"),
        ..Default::default()
    };
    let d = p
        .evaluate(&req, Protocol::Tcp, NOW, &mut |_, _| None)
        .unwrap();
    assert_eq!(d.outcome.as_str(), "reset");
    assert!(d.reason.contains("foo/p rule 0 (methods)"), "{}", d.reason);

    let mesh = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    extensionProviders: [{name: ext, envoyExtAuthzGrpc: {service: ext.foo.svc.cluster.local, port: 9000}}]\n---\n";
    let custom = |provider: &str| {
        ap(
            "c",
            "CUSTOM",
            "  rules: [{to: [{operation: {ports: [\"9090\"]}}]}]",
        )
        .replace(
            "  action: CUSTOM\n",
            &format!("  action: CUSTOM\n  provider: {{name: {provider}}}\n"),
        )
    };
    let cfg = config(&format!("{mesh}{}", custom("ext")));
    let wl = cfg.workload("foo", "server").unwrap();
    let p = WorkloadPolicy::compile(&cfg, wl, &InlineJwksOnly);
    let mut asked = String::new();
    let d = p
        .evaluate(&req, Protocol::Tcp, NOW, &mut |_, rule| {
            asked = rule.envoy_id();
            Some(warden_policy::engine::ExtAuthzAnswer::Deny)
        })
        .unwrap();
    assert_eq!(d.outcome.as_str(), "reset");
    assert_eq!(asked, "istio-ext-authz-ext-ns[foo]-policy[c]-rule[0]");

    let cfg = config(&format!("{mesh}{}", custom("missing")));
    let wl = cfg.workload("foo", "server").unwrap();
    let p = WorkloadPolicy::compile(&cfg, wl, &InlineJwksOnly);
    let d = p
        .evaluate(&req, Protocol::Tcp, NOW, &mut |_, _| None)
        .unwrap();
    assert_eq!(d.outcome.as_str(), "reset");
    let m = d.deciding.unwrap();
    assert_eq!(
        m.envoy_id(),
        "ns[foo]-policy[c]-rule[0]-deny-due-to-bad-CUSTOM-action"
    );
    assert!(
        d.reason.contains("fail closed") && d.reason.contains("missing"),
        "{}",
        d.reason
    );
}

/// The proxy forwards exactly what authorization saw: the decision carries the header edits.
#[test]
fn decision_carries_forwarding_header_edits() {
    let cfg = config(&ra(
        "iss1",
        "    outputClaimToHeaders: [{header: x-user, claim: sub}]\n    outputPayloadToHeader: x-jwt-payload",
    ));
    let t = token(serde_json::json!({"iss": "iss1", "sub": "alice"}));
    let wl = cfg.workload("foo", "server").unwrap();
    let p = WorkloadPolicy::compile(&cfg, wl, &InlineJwksOnly);
    let auth = format!("Bearer {t}");
    let headers = [("authorization", auth.as_str()), ("x-user", "mallory")];
    let req = Request {
        destination_port: 8080,
        http: Some(HttpRequest {
            method: "GET",
            authority: "server.foo:8080",
            target: "/",
            headers: &headers,
        }),
        ..Default::default()
    };
    let d = p
        .evaluate(&req, Protocol::Http, NOW, &mut |_, _| None)
        .unwrap();
    let e = d.header_edits;
    assert!(
        e.remove.contains(&"x-user".to_string()) && e.remove.contains(&"authorization".to_string()),
        "{e:?}"
    );
    assert!(
        e.set.contains(&("x-user".to_string(), "alice".to_string())),
        "{e:?}"
    );
    assert!(
        e.set
            .iter()
            .any(|(n, v)| n == "x-jwt-payload" && v == t.split('.').nth(1).unwrap()),
        "{e:?}"
    );
}
