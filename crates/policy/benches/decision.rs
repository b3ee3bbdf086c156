//! Decision and load benchmarks for the policy engine (issue 2's bars): one HTTP decision for
//! an mTLS peer against a workload with 10, 1,000 and 10,000 attached rules, the same with a
//! JWT, and loading + compiling 10,000 policies.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use warden_policy::authz::Protocol;
use warden_policy::config::{Config, Loader};
use warden_policy::engine::{HttpRequest, InlineJwksOnly, Request, WorkloadPolicy};

const JWKS: &str = include_str!("fixtures/jwks.json");
const TOKEN: &str = include_str!("fixtures/jwt-token.txt");
/// 2026-06-01T00:00:00Z, inside the fixture token's validity.
const NOW: i64 = 1_780_272_000;

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {istio-injection: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: bench}
spec:
  template:
    metadata: {labels: {app: api}}
    spec:
      serviceAccountName: api
      containers: [{name: api, ports: [{containerPort: 8080}]}]
"#;

/// `n` rules spread over policies of 10 rules, each rule allowing one caller identity a
/// method and a path prefix: the common shape of real allow-lists.
/// Rule shapes: `Principal` allows one exact identity; `Namespace` allows a whole namespace
/// (Istio's `.*/ns/<x>/.*` regex) on a path prefix.
#[derive(Clone, Copy)]
enum Shape {
    Principal,
    Namespace,
}

fn policies_shaped(n: usize, with_jwt: bool, shape: Shape) -> String {
    let mut s = String::from(APP);
    let per = 10.min(n);
    for p in 0..n.div_ceil(per) {
        s.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-{p:05}, namespace: bench}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  rules:\n"
        ));
        for r in 0..per {
            let i = p * per + r;
            // With a JWT, the rule needs both the caller identity and a token.
            let jwt = if with_jwt {
                ", requestPrincipals: [\"testing@secure.istio.io/*\"]"
            } else {
                ""
            };
            let source = match shape {
                Shape::Principal => {
                    format!("principals: [\"cluster.local/ns/client-{i}/sa/caller\"]")
                }
                Shape::Namespace => format!("namespaces: [\"client-{i}\"]"),
            };
            s.push_str(&format!(
                "  - from:\n    - source: {{{source}{jwt}}}\n    to:\n    - operation: {{methods: [GET, POST], paths: [\"/api/v1/items/{i}/*\"]}}\n"
            ));
        }
    }
    if with_jwt {
        s.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: bench}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  jwtRules:\n  - issuer: testing@secure.istio.io\n    jwks: '{}'\n",
            JWKS.trim()
        ));
    }
    s
}

fn load(text: &str) -> Config {
    let mut l = Loader::new();
    l.add_text("bench.yaml", text);
    let (cfg, diags) = l.finish();
    assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
    cfg
}

fn compile(cfg: &Config) -> WorkloadPolicy {
    let wl = cfg.workload("bench", "api").expect("workload");
    WorkloadPolicy::compile(cfg, wl, &InlineJwksOnly)
}

fn decide(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    for (with_jwt, shape) in [
        (false, Shape::Principal),
        (false, Shape::Namespace),
        (true, Shape::Principal),
    ] {
        for n in [10usize, 1_000, 10_000] {
            let cfg = load(&policies_shaped(n, with_jwt, shape));
            let policy = compile(&cfg);
            // The caller of the last rule: a linear scan would have to look at every rule.
            let peer = format!("spiffe://cluster.local/ns/client-{}/sa/caller", n - 1);
            let path = format!("/api/v1/items/{}/detail?verbose=1", n - 1);
            let auth = format!("Bearer {}", TOKEN.trim());
            let mut headers: Vec<(&str, &str)> = vec![
                ("user-agent", "curl/8.5.0"),
                ("accept", "*/*"),
                ("x-request-id", "5c4f6e2a-4d1b-4f0e-9d0a-3b2f1c0e9a7d"),
            ];
            if with_jwt {
                headers.push(("authorization", auth.as_str()));
            }
            let req = Request {
                source_ip: Some("10.0.0.7".parse().unwrap()),
                destination_ip: None,
                destination_port: 8080,
                sni: None,
                peer: Some(&peer),
                http: Some(HttpRequest {
                    method: "GET",
                    authority: "api.bench:8080",
                    target: &path,
                    headers: &headers,
                }),
            };
            let d = policy
                .evaluate(&req, Protocol::Http, NOW, &mut |_, _| None)
                .unwrap();
            assert_eq!(d.outcome.as_str(), "allow", "{}", d.reason);
            let name = match (with_jwt, shape) {
                (true, _) => "http_mtls_jwt",
                (false, Shape::Principal) => "http_mtls",
                (false, Shape::Namespace) => "http_mtls_namespace_prefix",
            };
            g.bench_with_input(BenchmarkId::new(name, n), &req, |b, req| {
                b.iter(|| {
                    policy
                        .evaluate(black_box(req), Protocol::Http, NOW, &mut |_, _| None)
                        .unwrap()
                })
            });
        }
    }
    g.finish();
}

fn load_compile(c: &mut Criterion) {
    // 10,000 policies of one rule each.
    let mut one_rule = String::from(APP);
    for i in 0..10_000 {
        one_rule.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{i:05}, namespace: bench}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  rules:\n  - from:\n    - source: {{principals: [\"cluster.local/ns/client-{i}/sa/caller\"]}}\n    to:\n    - operation: {{methods: [GET], paths: [\"/api/v1/items/{i}/*\"]}}\n"
        ));
    }
    let mut g = c.benchmark_group("load");
    g.sample_size(10);
    g.bench_function("parse_validate_compile_10000_policies", |b| {
        b.iter(|| {
            let cfg = load(black_box(&one_rule));
            let v = warden_policy::validate::validate(&cfg);
            black_box(v);
            compile(&cfg)
        })
    });
    g.finish();
}

criterion_group!(benches, decide, load_compile);
criterion_main!(benches);
