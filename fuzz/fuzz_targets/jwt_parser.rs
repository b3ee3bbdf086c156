//! Any bytes as a bearer token (and as a JWKS): parsing and verification must answer with a
//! status, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_policy::jwt::{authenticate, Jwks, JwtProvider, KeySource, TokenRequest};

const JWKS: &str = r#"{"keys":[{"kty":"oct","alg":"HS256","kid":"k","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}]}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Jwks::parse(text);
    let provider = JwtProvider::new(String::new(), KeySource::from_jwks_json(JWKS));
    let auth = format!("Bearer {text}");
    let headers = [("authorization", auth.as_str())];
    let req = TokenRequest { method: "GET", headers: &headers, query: None };
    let _ = authenticate(std::slice::from_ref(&provider), &req, 1_780_272_000);
});
