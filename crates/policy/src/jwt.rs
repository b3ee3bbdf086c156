//! JWT request authentication, as Istio's `RequestAuthentication` (`jwtRules`) is enforced by
//! the Envoy sidecar's `jwt_authn` filter and its bundled JWT verifier.
//!
//! This module owns: finding tokens in a request (headers with prefixes, query parameters,
//! cookies, or the default `Authorization: Bearer` / `access_token` locations), parsing and
//! format-checking a token, the issuer / time / audience checks, parsing a JWKS and verifying
//! signatures against it, and combining several providers the way Istio's generated Envoy
//! requirement does. Failure reasons are Envoy's status strings verbatim, because they are the
//! 401/403 response bodies clients see and compare against.
//!
//! It does no I/O and never reads the clock: the caller passes already-fetched keys
//! ([`KeySource`]) and the current Unix time.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

/// Tolerance applied to `nbf` and `exp`; Istio leaves Envoy's default in place.
pub const CLOCK_SKEW_SECONDS: i64 = 60;

/// Tokens longer than this are rejected as malformed before any decoding work.
// Choice: Envoy relies on its 60 KiB request-header limit instead; a cap here keeps a huge
// query parameter or cookie from costing base64/JSON work.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;

const DEFAULT_HEADER: &str = "authorization";
const DEFAULT_PREFIX: &str = "Bearer ";
const DEFAULT_PARAM: &str = "access_token";
const ALWAYS_SPACE_DELIMITED: [&str; 2] = ["scope", "permission"];
const SUPPORTED_ALGS: [&str; 13] = [
    "ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256",
    "PS384", "PS512", "EdDSA",
];

/// absl's web-safe unescape is lenient about padding and stray trailing bits; matching that
/// keeps us from rejecting tokens the sidecar accepts.
const B64URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// Why a request's JWT was not accepted; [`JwtStatus::message`] is Envoy's response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JwtStatus {
    Missing,
    NotYetValid,
    Expired,
    BadFormat,
    HeaderBadBase64,
    HeaderBadJson,
    HeaderBadAlg,
    HeaderNotImplementedAlg,
    HeaderBadKid,
    PayloadBadBase64,
    PayloadBadJson,
    IssNotString,
    SubNotString,
    IatNotInteger,
    IatOutOfRange,
    NbfNotInteger,
    NbfOutOfRange,
    ExpNotInteger,
    ExpOutOfRange,
    JtiNotString,
    AudNotString,
    SignatureBadBase64,
    Ed25519SignatureWrongLength,
    UnknownIssuer,
    AudienceNotAllowed,
    VerificationFail,
    JwksKidAlgMismatch,
    JwksFetchFail,
    JwksNoValidKeys,
}

impl JwtStatus {
    /// The exact text Envoy puts in the body of the denial.
    pub fn message(&self) -> &'static str {
        match self {
            Self::Missing => "Jwt is missing",
            Self::NotYetValid => "Jwt not yet valid",
            Self::Expired => "Jwt is expired",
            Self::BadFormat => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            Self::HeaderBadBase64 => "Jwt header is an invalid Base64url encoded",
            Self::HeaderBadJson => "Jwt header is an invalid JSON",
            Self::HeaderBadAlg => "Jwt header [alg] field is required and must be a string",
            Self::HeaderNotImplementedAlg => "Jwt header [alg] is not supported",
            Self::HeaderBadKid => "Jwt header [kid] field is not a string",
            Self::PayloadBadBase64 => "Jwt payload is an invalid Base64url encoded",
            Self::PayloadBadJson => "Jwt payload is an invalid JSON",
            Self::IssNotString => "Jwt payload [iss] field is not a string",
            Self::SubNotString => "Jwt payload [sub] field is not a string",
            Self::IatNotInteger => "Jwt payload [iat] field is not an integer",
            Self::IatOutOfRange => "Jwt payload [iat] field is not a positive 64 bit integer",
            Self::NbfNotInteger => "Jwt payload [nbf] field is not an integer",
            Self::NbfOutOfRange => "Jwt payload [nbf] field is not a positive 64 bit integer",
            Self::ExpNotInteger => "Jwt payload [exp] field is not an integer",
            Self::ExpOutOfRange => "Jwt payload [exp] field is not a positive 64 bit integer",
            Self::JtiNotString => "Jwt payload [jti] field is not a string",
            Self::AudNotString => "Jwt payload [aud] field is not a string or string list",
            Self::SignatureBadBase64 => "Jwt signature is an invalid Base64url encoded",
            Self::Ed25519SignatureWrongLength => "Jwt ED25519 signature is wrong length",
            Self::UnknownIssuer => "Jwt issuer is not configured",
            Self::AudienceNotAllowed => "Audiences in Jwt are not allowed",
            Self::VerificationFail => "Jwt verification fails",
            Self::JwksKidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
            Self::JwksFetchFail => "Jwks remote fetch is failed",
            Self::JwksNoValidKeys => "Jwks doesn't have any valid public key",
        }
    }

    /// Envoy answers a wrong audience with 403 and every other failure with 401.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::AudienceNotAllowed => 403,
            _ => 401,
        }
    }
}

impl fmt::Display for JwtStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for JwtStatus {}

/// Why a JWKS document could not be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    #[error("Jwks is an invalid JSON")]
    InvalidJson,
    #[error("Jwks does not have [keys] field")]
    NoKeys,
    #[error("[keys] in Jwks is not an array")]
    BadKeys,
    /// `reason` is the problem with the first rejected key, for diagnostics.
    #[error("Jwks doesn't have any valid public key: {reason}")]
    NoValidKeys { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EcCurve {
    P256,
    P384,
    P521,
}

impl EcCurve {
    fn coordinate_len(self) -> usize {
        match self {
            Self::P256 => 32,
            Self::P384 => 48,
            Self::P521 => 66,
        }
    }
}

#[derive(Clone, Debug)]
enum KeyMaterial {
    /// The key for jsonwebtoken (PSS), and parsed once for PKCS#1 v1.5 (RS256/384/512), the
    /// common case: re-building an RSA key per request cost about a third of a JWT request.
    Rsa(DecodingKey, Arc<RsaPkcs1>),
    Ec {
        curve: EcCurve,
        key: DecodingKey,
    },
    Oct(DecodingKey),
    Ed25519(DecodingKey),
}

#[derive(Clone, Debug)]
struct Jwk {
    /// Empty when absent, as in Envoy: an empty kid matches any token kid.
    kid: String,
    /// Empty when absent: an empty alg matches any token alg.
    alg: String,
    material: KeyMaterial,
}

/// A parsed JSON Web Key Set holding only the keys Envoy would accept.
#[derive(Clone, Debug, Default)]
pub struct Jwks {
    keys: Vec<Jwk>,
    /// Tokens (signed part and signature, byte for byte) whose signature one of these keys
    /// verified. Only the signature check is remembered: issuer, time, audience and every
    /// other check still run on each request. Shared by clones, which hold the same keys.
    verified: Arc<VerifiedTokens>,
}

/// A bounded memory of verified signatures. RSA verification is most of a JWT request's
/// cost, and clients resend the same token for its whole lifetime.
#[derive(Debug, Default)]
struct VerifiedTokens(std::sync::Mutex<std::collections::HashSet<Box<[u8]>>>);

/// Enough for every client of a busy workload; when full the memory starts again, so a
/// stream of distinct valid tokens costs at most this much memory.
const VERIFIED_TOKENS_MAX: usize = 4096;

impl VerifiedTokens {
    fn key(signed: &str, signature: &[u8]) -> Box<[u8]> {
        let mut k = Vec::with_capacity(signed.len() + 1 + signature.len());
        k.extend_from_slice(signed.as_bytes());
        k.push(b'.');
        k.extend_from_slice(signature);
        k.into_boxed_slice()
    }

    fn contains(&self, key: &[u8]) -> bool {
        self.0.lock().map(|set| set.contains(key)).unwrap_or(false)
    }

    fn insert(&self, key: Box<[u8]>) {
        if let Ok(mut set) = self.0.lock() {
            if set.len() >= VERIFIED_TOKENS_MAX {
                set.clear();
            }
            set.insert(key);
        }
    }
}

impl Jwks {
    /// Parses a JWKS document. Individually invalid keys are skipped (Envoy does the same);
    /// the set is an error only when nothing usable remains.
    // Choice: the legacy `{kid: "<x509 PEM>"}` map form is not accepted (reported as `NoKeys`).
    pub fn parse(json: &str) -> Result<Jwks, JwksError> {
        let root: Map<String, Value> =
            serde_json::from_str(json).map_err(|_| JwksError::InvalidJson)?;
        let list = match root.get("keys") {
            None => return Err(JwksError::NoKeys),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(JwksError::BadKeys),
        };
        let mut keys = Vec::new();
        let mut first_error: Option<&'static str> = None;
        for entry in list {
            // Non-object entries are skipped silently, not reported, exactly like Envoy.
            let Value::Object(obj) = entry else { continue };
            match parse_jwk(obj) {
                Ok(key) => keys.push(key),
                Err(reason) => {
                    first_error.get_or_insert(reason);
                }
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoValidKeys {
                reason: first_error.unwrap_or("[keys] is empty").to_string(),
            });
        }
        Ok(Jwks {
            keys,
            verified: Arc::default(),
        })
    }

    /// True when any key carries private parts (`d`, `p` or `q`), which a published JWKS
    /// should never do; meant for a configuration warning, so junk input is simply `false`.
    pub fn has_private_material(json: &str) -> bool {
        let Ok(Value::Object(root)) = serde_json::from_str::<Value>(json) else {
            return false;
        };
        let Some(Value::Array(list)) = root.get("keys") else {
            return false;
        };
        list.iter().any(|key| {
            key.as_object()
                .is_some_and(|k| ["d", "p", "q"].iter().any(|f| k.contains_key(*f)))
        })
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

enum Field<'a> {
    Missing,
    WrongType,
    Str(&'a str),
}

fn string_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Field<'a> {
    match obj.get(name) {
        None => Field::Missing,
        Some(Value::String(s)) => Field::Str(s),
        Some(_) => Field::WrongType,
    }
}

/// Required string member of a JWK; the messages are Envoy's per-field key statuses.
fn required<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    missing: &'static str,
    wrong_type: &'static str,
) -> Result<&'a str, &'static str> {
    match string_field(obj, name) {
        Field::Missing => Err(missing),
        Field::WrongType => Err(wrong_type),
        Field::Str(s) => Ok(s),
    }
}

fn parse_jwk(obj: &Map<String, Value>) -> Result<Jwk, &'static str> {
    let kty = required(
        obj,
        "kty",
        "[kty] is missing in [keys]",
        "[kty] is bad in [keys]",
    )?;
    // A non-string kid/alg is ignored rather than rejected, as Envoy does.
    let kid = match string_field(obj, "kid") {
        Field::Str(s) => s.to_string(),
        _ => String::new(),
    };
    let alg = match string_field(obj, "alg") {
        Field::Str(s) => s.to_string(),
        _ => String::new(),
    };
    let material = match kty {
        "RSA" => parse_rsa(obj, &alg)?,
        "EC" => parse_ec(obj, &alg)?,
        "oct" => parse_oct(obj, &alg)?,
        "OKP" => parse_okp(obj, &alg)?,
        _ => return Err("[kty] is not supported in [keys]"),
    };
    Ok(Jwk { kid, alg, material })
}

/// Big-endian integer bytes without leading zeros, as BN_bin2bn would read them.
fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

fn parse_rsa(obj: &Map<String, Value>, alg: &str) -> Result<KeyMaterial, &'static str> {
    const PARSE_ERROR: &str = "Jwks RSA [n] or [e] field is missing or has a parse error";
    if !alg.is_empty() && !alg.starts_with("RS") && !alg.starts_with("PS") {
        return Err("[alg] is not started with [RS] or [PS] for an RSA key");
    }
    let n = required(
        obj,
        "n",
        "[n] field is missing for a RSA key",
        "[n] field is not string for a RSA key",
    )?;
    let e = required(
        obj,
        "e",
        "[e] field is missing for a RSA key",
        "[e] field is not string for a RSA key",
    )?;
    let n = decode_b64url(n).ok_or(PARSE_ERROR)?;
    let e = decode_b64url(e).ok_or(PARSE_ERROR)?;
    let (n, e) = (strip_leading_zeros(&n), strip_leading_zeros(&e));
    // Envoy refuses non-standard exponents up front; its key check also needs an odd modulus.
    if e != [3] && e != [1, 0, 1] {
        return Err(PARSE_ERROR);
    }
    if n.last().is_none_or(|b| b & 1 == 0) || n.len() > 16384 / 8 {
        return Err(PARSE_ERROR);
    }
    Ok(KeyMaterial::Rsa(
        DecodingKey::from_rsa_raw_components(n, e),
        Arc::new(RsaPkcs1::new(n, e)),
    ))
}

/// An RSA key parsed once per PKCS#1 v1.5 digest, with the parameters jsonwebtoken uses
/// (2048–8192-bit moduli), so a verification here and there accept exactly the same tokens.
pub(crate) struct RsaPkcs1 {
    sha256: Option<aws_lc_rs::signature::ParsedPublicKey>,
    sha384: Option<aws_lc_rs::signature::ParsedPublicKey>,
    sha512: Option<aws_lc_rs::signature::ParsedPublicKey>,
}

impl std::fmt::Debug for RsaPkcs1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RsaPkcs1")
    }
}

impl RsaPkcs1 {
    fn new(n: &[u8], e: &[u8]) -> Self {
        use aws_lc_rs::signature::{
            RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_2048_8192_SHA384,
            RSA_PKCS1_2048_8192_SHA512,
        };
        let c = RsaPublicKeyComponents { n, e };
        RsaPkcs1 {
            sha256: c.to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA256).ok(),
            sha384: c.to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA384).ok(),
            sha512: c.to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA512).ok(),
        }
    }

    /// `None` when `alg` is not a PKCS#1 v1.5 algorithm (the caller falls back).
    fn verify(&self, alg: &str, message: &[u8], signature: &[u8]) -> Option<bool> {
        let key = match alg {
            "RS256" => &self.sha256,
            "RS384" => &self.sha384,
            "RS512" => &self.sha512,
            _ => return None,
        };
        // A key the library refused to parse verifies nothing, as jsonwebtoken would refuse it.
        Some(
            key.as_ref()
                .is_some_and(|k| k.verify_sig(message, signature).is_ok()),
        )
    }
}

fn parse_ec(obj: &Map<String, Value>, alg: &str) -> Result<KeyMaterial, &'static str> {
    if !alg.is_empty() && !alg.starts_with("ES") {
        return Err("[alg] is not started with [ES] for an EC key");
    }
    let crv = match string_field(obj, "crv") {
        Field::Missing => "",
        Field::WrongType => return Err("[crv] field is not string for an EC key"),
        Field::Str(s) => s,
    };
    if !alg.is_empty()
        && !crv.is_empty()
        && !matches!(
            (alg, crv),
            ("ES256", "P-256") | ("ES384", "P-384") | ("ES512", "P-521")
        )
    {
        return Err("[crv] field specified is not compatible with [alg] for an EC key");
    }
    let curve = if alg == "ES256" || crv == "P-256" || (alg.is_empty() && crv.is_empty()) {
        EcCurve::P256
    } else if alg == "ES384" || crv == "P-384" {
        EcCurve::P384
    } else if alg == "ES512" || crv == "P-521" {
        EcCurve::P521
    } else {
        return Err("[crv] or [alg] field is not supported for an EC key");
    };
    let x = required(
        obj,
        "x",
        "[x] field is missing for an EC key",
        "[x] field is not string for an EC key",
    )?;
    let y = required(
        obj,
        "y",
        "[y] field is missing for an EC key",
        "[y] field is not string for an EC key",
    )?;
    const BAD_BASE64: &str = "Jwks EC [x] or [y] field is an invalid Base64.";
    let x = decode_b64url(x).ok_or(BAD_BASE64)?;
    let y = decode_b64url(y).ok_or(BAD_BASE64)?;
    // Coordinates are integers, so short encodings are left-padded and long ones refused.
    // Choice: whether the point is on the curve is only found out at verification time
    // (it then never verifies), where Envoy drops such a key while parsing.
    let len = curve.coordinate_len();
    let mut point = Vec::with_capacity(1 + 2 * len);
    point.push(0x04);
    for coordinate in [strip_leading_zeros(&x), strip_leading_zeros(&y)] {
        if coordinate.len() > len {
            return Err("Jwks EC [x] and [y] fields have a parse error.");
        }
        point.resize(point.len() + len - coordinate.len(), 0);
        point.extend_from_slice(coordinate);
    }
    Ok(KeyMaterial::Ec {
        curve,
        key: DecodingKey::from_ec_der(&point),
    })
}

fn parse_oct(obj: &Map<String, Value>, alg: &str) -> Result<KeyMaterial, &'static str> {
    if !alg.is_empty() && !matches!(alg, "HS256" | "HS384" | "HS512") {
        return Err("[alg] does not start with [HS] for an HMAC key");
    }
    let k = required(
        obj,
        "k",
        "[k] field is missing for an HMAC key",
        "[k] field is not string for an HMAC key",
    )?;
    match decode_b64url(k) {
        Some(secret) if !secret.is_empty() => {
            Ok(KeyMaterial::Oct(DecodingKey::from_secret(&secret)))
        }
        _ => Err("Jwks Oct key is an invalid Base64"),
    }
}

fn parse_okp(obj: &Map<String, Value>, alg: &str) -> Result<KeyMaterial, &'static str> {
    if !alg.is_empty() && alg != "EdDSA" {
        return Err("[alg] is not [EdDSA] for an OKP key");
    }
    let crv = required(
        obj,
        "crv",
        "[crv] field is missing for an OKP key",
        "[crv] field is not string for an OKP key",
    )?;
    if crv != "Ed25519" {
        return Err("[crv] field is not supported for an OKP key");
    }
    let x = required(
        obj,
        "x",
        "[x] field is missing for an OKP key",
        "[x] field is not string for an OKP key",
    )?;
    let x = decode_b64url(x).ok_or("Jwks OKP [x] field is an invalid Base64.")?;
    if x.len() != 32 {
        return Err("Jwks OKP [x] field is wrong length.");
    }
    Ok(KeyMaterial::Ed25519(DecodingKey::from_ed_der(&x)))
}

/// Where a provider's verification keys come from, as already resolved by the caller.
#[derive(Clone, Debug)]
pub enum KeySource {
    Inline(Jwks),
    /// A `jwksUri` that has never been fetched successfully.
    Unavailable {
        reason: String,
    },
    /// Keys were configured but none of them is usable (Envoy: no valid public key).
    Invalid {
        reason: String,
    },
}

impl KeySource {
    /// Inline `jwks` text as Envoy treats it: an unusable document is not a config error,
    /// it makes every token of that provider fail with "no valid public key".
    pub fn from_jwks_json(json: &str) -> KeySource {
        match Jwks::parse(json) {
            Ok(jwks) => KeySource::Inline(jwks),
            Err(err) => KeySource::Invalid {
                reason: err.to_string(),
            },
        }
    }
}

/// A header to read a token from; the token is what follows `prefix` (empty: whole value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderLocation {
    pub name: String,
    pub prefix: String,
}

/// One Istio `jwtRules` entry.
#[derive(Clone, Debug)]
pub struct JwtProvider {
    /// Required `iss`; empty accepts any issuer.
    pub issuer: String,
    /// Accepted audiences; empty disables the audience check.
    pub audiences: Vec<String>,
    pub keys: KeySource,
    pub from_headers: Vec<HeaderLocation>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    /// Claims split on spaces in the verified payload, besides `scope` and `permission`.
    pub space_delimited_claims: Vec<String>,
}

impl JwtProvider {
    /// A provider reading the default locations.
    pub fn new(issuer: impl Into<String>, keys: KeySource) -> Self {
        JwtProvider {
            issuer: issuer.into(),
            audiences: Vec::new(),
            keys,
            from_headers: Vec::new(),
            from_params: Vec::new(),
            from_cookies: Vec::new(),
            space_delimited_claims: Vec::new(),
        }
    }
}

/// The parts of an HTTP request that JWT authentication looks at.
#[derive(Clone, Copy, Debug)]
pub struct TokenRequest<'a> {
    pub method: &'a str,
    /// Names already lowercase; a name may repeat.
    pub headers: &'a [(&'a str, &'a str)],
    /// Raw query string, without the `?`.
    pub query: Option<&'a str>,
}

impl TokenRequest<'_> {
    fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// A token that passed every check.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedJwt {
    /// The payload object, with space-delimited claims already split into string arrays.
    pub payload: Value,
    /// The `issuer` configured on the provider that accepted the token (may be empty).
    pub provider_issuer: String,
    /// Index into the providers slice of the provider that accepted the token.
    pub provider_index: usize,
    /// The token's payload segment exactly as sent (base64url), for `outputPayloadToHeader`.
    pub raw_payload: String,
    /// Lowercase names of the headers the accepted tokens came from (removed upstream unless
    /// `forwardOriginalToken`).
    pub token_headers: Vec<String>,
}

impl VerifiedJwt {
    pub fn issuer(&self) -> Option<&str> {
        self.payload.get("iss").and_then(Value::as_str)
    }

    pub fn subject(&self) -> Option<&str> {
        self.payload.get("sub").and_then(Value::as_str)
    }

    /// Istio's `request.auth.principal`: `iss/sub`, only when both are strings.
    pub fn request_principal(&self) -> Option<String> {
        Some(format!("{}/{}", self.issuer()?, self.subject()?))
    }

    /// Nested claim lookup, e.g. `["realm_access", "roles"]`.
    pub fn claim(&self, path: &[&str]) -> Option<&Value> {
        path.iter()
            .try_fold(&self.payload, |value, name| value.as_object()?.get(*name))
    }
}

/// Result of authenticating one request against all providers attached to the workload.
#[derive(Clone, Debug, PartialEq)]
pub enum JwtOutcome {
    /// No token where any provider looks (or a CORS preflight): the request continues
    /// unauthenticated and authorization decides.
    NoToken,
    Verified(VerifiedJwt),
    /// The request is denied with `status.http_status()` and `status.message()`.
    Failed {
        status: JwtStatus,
        provider_issuer: Option<String>,
    },
}

impl JwtOutcome {
    /// The denial code, if the request must be denied.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            JwtOutcome::Failed { status, .. } => Some(status.http_status()),
            _ => None,
        }
    }
}

enum ProviderResult {
    Missing,
    Verified {
        payload: Value,
        raw_payload: String,
        headers: Vec<String>,
    },
    Failed(JwtStatus),
}

/// Authenticates `req` against every provider (all `jwtRules` of all attached
/// `RequestAuthentication`s, in the caller's order: Istio sorts them by issuer).
///
/// Istio asks Envoy for `p0 OR allow_missing` with one provider, and for
/// `ANY(p0, …, pn-1, ALL(p0 OR allow_missing, …))` with more; this reproduces that.
pub fn authenticate(
    providers: &[JwtProvider],
    req: &TokenRequest<'_>,
    now_unix: i64,
) -> JwtOutcome {
    // Istio turns on Envoy's CORS-preflight bypass.
    if providers.is_empty() || is_cors_preflight(req) {
        return JwtOutcome::NoToken;
    }
    let mut results = Vec::with_capacity(providers.len());
    for (provider_index, provider) in providers.iter().enumerate() {
        match run_provider(provider, req, now_unix) {
            // The ANY completes on its first successful child, in order.
            ProviderResult::Verified {
                payload,
                raw_payload,
                headers,
            } => {
                return JwtOutcome::Verified(VerifiedJwt {
                    payload,
                    provider_issuer: provider.issuer.clone(),
                    provider_index,
                    raw_payload,
                    token_headers: headers,
                })
            }
            ProviderResult::Missing => results.push(JwtStatus::Missing),
            ProviderResult::Failed(status) => results.push(status),
        }
    }
    // `pi OR allow_missing` passes on a missing token, so with no failure anywhere the ALL
    // branch (or the single provider's requirement) lets the request through.
    let Some(first_failure) = results.iter().position(|s| *s != JwtStatus::Missing) else {
        return JwtOutcome::NoToken;
    };
    let (status, index) = if providers.len() == 1 {
        (results[0], 0)
    } else {
        // Choice (from Envoy's AnyVerifier): children are p0..pn-1 then ALL, whose status is
        // that of its first failing provider. The answer is the last child status that is
        // neither "missing" nor "issuer not configured", else the first "issuer not
        // configured". So a real error beats an issuer mismatch (a token meant for another
        // provider), and when the first failing provider failed for a real reason, its
        // status wins.
        let children = results
            .iter()
            .copied()
            .enumerate()
            .chain(std::iter::once((first_failure, results[first_failure])));
        let mut chosen = (JwtStatus::Missing, first_failure);
        for (index, status) in children {
            let real_error = status != JwtStatus::Missing && status != JwtStatus::UnknownIssuer;
            if real_error || (chosen.0 == JwtStatus::Missing && status != JwtStatus::Missing) {
                chosen = (status, index);
            }
        }
        chosen
    };
    JwtOutcome::Failed {
        status,
        provider_issuer: Some(providers[index].issuer.clone()),
    }
}

fn is_cors_preflight(req: &TokenRequest<'_>) -> bool {
    let present = |name: &str| {
        req.header_values(name)
            .next()
            .is_some_and(|v| !v.is_empty())
    };
    req.method == "OPTIONS" && present("origin") && present("access-control-request-method")
}

/// Checks every token found at this provider's own locations; all of them must pass.
fn run_provider(provider: &JwtProvider, req: &TokenRequest<'_>, now_unix: i64) -> ProviderResult {
    let tokens = extract_tokens(provider, req);
    let mut payload = None;
    // Envoy verifies from the last extracted token backwards and stops at the first failure;
    // the payload kept is the last one verified, i.e. the first token extracted.
    for (token, _) in tokens.iter().rev() {
        match verify_token(provider, token, now_unix) {
            Ok(verified) => payload = Some(verified),
            Err(status) => return ProviderResult::Failed(status),
        }
    }
    match payload {
        Some((payload, raw_payload)) => {
            let mut headers: Vec<String> = tokens.into_iter().filter_map(|(_, h)| h).collect();
            headers.dedup();
            ProviderResult::Verified {
                payload: normalize_payload(payload, provider),
                raw_payload,
                headers,
            }
        }
        None => ProviderResult::Missing,
    }
}

/// Tokens in Envoy's extraction order: headers (sorted by name+prefix), then query
/// parameters (sorted by name), then cookies (sorted by name).
fn extract_tokens(provider: &JwtProvider, req: &TokenRequest<'_>) -> Vec<(String, Option<String>)> {
    let mut headers: BTreeMap<String, (String, &str)> = BTreeMap::new();
    let mut params: Vec<&str> = provider.from_params.iter().map(String::as_str).collect();
    let mut cookies: Vec<&str> = provider.from_cookies.iter().map(String::as_str).collect();
    for location in &provider.from_headers {
        let name = location.name.to_ascii_lowercase();
        headers.insert(
            format!("{name}{}", location.prefix),
            (name, location.prefix.as_str()),
        );
    }
    if provider.from_headers.is_empty() && params.is_empty() && cookies.is_empty() {
        headers.insert(
            format!("{DEFAULT_HEADER}{DEFAULT_PREFIX}"),
            (DEFAULT_HEADER.to_string(), DEFAULT_PREFIX),
        );
        params.push(DEFAULT_PARAM);
    }
    params.sort_unstable();
    params.dedup();
    cookies.sort_unstable();
    cookies.dedup();

    let mut tokens = Vec::new();
    for (name, prefix) in headers.values() {
        for value in req.header_values(name) {
            if prefix.is_empty() {
                tokens.push((value.to_string(), Some(name.clone())));
                continue;
            }
            // Envoy looks for the prefix anywhere in the value, not only at the start; a value
            // without it is simply not a token for this location (e.g. `Basic ...`).
            if let Some(pos) = value.find(prefix) {
                tokens.push((
                    token_after(value, pos + prefix.len()).to_string(),
                    Some(name.clone()),
                ));
            }
        }
    }
    if let (false, Some(query)) = (params.is_empty(), req.query) {
        let parsed = parse_query(query);
        for name in &params {
            if let Some((_, value)) = parsed.iter().find(|(k, _)| k == name) {
                tokens.push((value.clone(), None));
            }
        }
    }
    if !cookies.is_empty() {
        let parsed = parse_cookies(req);
        for name in &cookies {
            if let Some((_, value)) = parsed.iter().find(|(k, _)| k == name) {
                tokens.push(((*value).to_string(), None));
            }
        }
    }
    tokens
}

/// The token starts at the first base64url-or-dot character after the prefix and runs to the
/// end of the value; with no such character Envoy falls back to the whole header value.
fn token_after(value: &str, after: usize) -> &str {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    match value[after..].find(is_token_char) {
        Some(offset) => &value[after + offset..],
        None => value,
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    let query = query.split('#').next().unwrap_or_default();
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

// Choice: `+` is kept as is; it is not a base64url character, so such a token fails
// either way.
fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `name=value` pairs from every `cookie` header, first occurrence first; surrounding double
/// quotes are removed from values, as Envoy does.
fn parse_cookies<'r>(req: &TokenRequest<'r>) -> Vec<(&'r str, &'r str)> {
    req.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|cookie| {
            let (key, value) = cookie.split_once('=')?;
            let key = key.trim_start_matches(' ');
            let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some(unquoted) => unquoted,
                None => value,
            };
            Some((key, value))
        })
        .collect()
}

/// Decodes base64url the way absl's `WebSafeBase64Unescape` does: ASCII whitespace is
/// skipped and `=` padding is optional.
fn decode_b64url(input: &str) -> Option<Vec<u8>> {
    let cleaned: Vec<u8> = input
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != 0x0b)
        .collect();
    let data_len = cleaned
        .iter()
        .rposition(|&b| b != b'=')
        .map_or(0, |p| p + 1);
    let padding = cleaned.len() - data_len;
    if padding > 2 || (padding > 0 && cleaned.len() & 3 != 0) {
        return None;
    }
    B64URL_LENIENT.decode(&cleaned[..data_len]).ok()
}

struct ParsedJwt<'t> {
    alg: String,
    kid: String,
    iss: String,
    nbf: u64,
    exp: u64,
    audiences: Vec<String>,
    payload: Map<String, Value>,
    signature: Vec<u8>,
    header_b64: &'t str,
    payload_b64: &'t str,
}

/// Reads a numeric claim like Envoy does: JSON numbers are doubles, fractions truncate,
/// and an absent claim reads as 0 (which for `exp` means "never expires").
fn u64_claim(
    payload: &Map<String, Value>,
    name: &str,
    not_integer: JwtStatus,
    out_of_range: JwtStatus,
) -> Result<u64, JwtStatus> {
    match payload.get(name) {
        None => Ok(0),
        Some(Value::Number(n)) => {
            let value = n.as_f64().ok_or(not_integer)?;
            if value < 0.0 || value >= u64::MAX as f64 {
                return Err(out_of_range);
            }
            Ok(value as u64)
        }
        Some(_) => Err(not_integer),
    }
}

fn optional_string(
    obj: &Map<String, Value>,
    name: &str,
    wrong_type: JwtStatus,
) -> Result<String, JwtStatus> {
    match string_field(obj, name) {
        Field::Missing => Ok(String::new()),
        Field::WrongType => Err(wrong_type),
        Field::Str(s) => Ok(s.to_string()),
    }
}

impl<'t> ParsedJwt<'t> {
    fn parse(token: &'t str) -> Result<Self, JwtStatus> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtStatus::BadFormat);
        }
        // Envoy splits with empty pieces dropped, so `a..b.c` counts as three sections.
        let mut sections = token.split('.').filter(|s| !s.is_empty());
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) = (
            sections.next(),
            sections.next(),
            sections.next(),
            sections.next(),
        ) else {
            return Err(JwtStatus::BadFormat);
        };

        let header = decode_b64url(header_b64).ok_or(JwtStatus::HeaderBadBase64)?;
        let header: Map<String, Value> =
            serde_json::from_slice(&header).map_err(|_| JwtStatus::HeaderBadJson)?;
        let alg = match header.get("alg") {
            Some(Value::String(alg)) => alg.clone(),
            _ => return Err(JwtStatus::HeaderBadAlg),
        };
        if !SUPPORTED_ALGS.contains(&alg.as_str()) {
            return Err(JwtStatus::HeaderNotImplementedAlg);
        }
        let kid = optional_string(&header, "kid", JwtStatus::HeaderBadKid)?;

        let payload = decode_b64url(payload_b64).ok_or(JwtStatus::PayloadBadBase64)?;
        let payload: Map<String, Value> =
            serde_json::from_slice(&payload).map_err(|_| JwtStatus::PayloadBadJson)?;
        let iss = optional_string(&payload, "iss", JwtStatus::IssNotString)?;
        optional_string(&payload, "sub", JwtStatus::SubNotString)?;
        u64_claim(
            &payload,
            "iat",
            JwtStatus::IatNotInteger,
            JwtStatus::IatOutOfRange,
        )?;
        let nbf = u64_claim(
            &payload,
            "nbf",
            JwtStatus::NbfNotInteger,
            JwtStatus::NbfOutOfRange,
        )?;
        let exp = u64_claim(
            &payload,
            "exp",
            JwtStatus::ExpNotInteger,
            JwtStatus::ExpOutOfRange,
        )?;
        optional_string(&payload, "jti", JwtStatus::JtiNotString)?;
        let audiences = match payload.get("aud") {
            None => Vec::new(),
            Some(Value::String(aud)) => vec![aud.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or(JwtStatus::AudNotString)?,
            Some(_) => return Err(JwtStatus::AudNotString),
        };
        let signature = decode_b64url(signature_b64).ok_or(JwtStatus::SignatureBadBase64)?;
        Ok(ParsedJwt {
            alg,
            kid,
            iss,
            nbf,
            exp,
            audiences,
            payload,
            signature,
            header_b64,
            payload_b64,
        })
    }
}

/// Parse, then issuer, time, audience and signature, in Envoy's order (the order decides
/// which status a client sees when several things are wrong).
fn verify_token(
    provider: &JwtProvider,
    token: &str,
    now_unix: i64,
) -> Result<(Map<String, Value>, String), JwtStatus> {
    let jwt = ParsedJwt::parse(token)?;
    if !provider.issuer.is_empty() && jwt.iss != provider.issuer {
        return Err(JwtStatus::UnknownIssuer);
    }
    let now = i128::from(now_unix);
    let skew = i128::from(CLOCK_SKEW_SECONDS);
    if now + skew < i128::from(jwt.nbf) {
        return Err(JwtStatus::NotYetValid);
    }
    if jwt.exp != 0 && now > i128::from(jwt.exp) + skew {
        return Err(JwtStatus::Expired);
    }
    if !audiences_allowed(&provider.audiences, &jwt.audiences) {
        return Err(JwtStatus::AudienceNotAllowed);
    }
    match &provider.keys {
        KeySource::Inline(jwks) if !jwks.is_empty() => verify_signature(&jwt, jwks)?,
        KeySource::Inline(_) | KeySource::Invalid { .. } => return Err(JwtStatus::JwksNoValidKeys),
        KeySource::Unavailable { .. } => return Err(JwtStatus::JwksFetchFail),
    }
    let raw = jwt.payload_b64.to_string();
    Ok((jwt.payload, raw))
}

/// Strips one leading `http://` or `https://` and one trailing `/`, so `https://svc/` and
/// `svc` compare equal.
fn sanitize_audience(aud: &str) -> &str {
    let rest = aud
        .strip_prefix("http://")
        .or_else(|| aud.strip_prefix("https://"))
        .unwrap_or(aud);
    rest.strip_suffix('/').unwrap_or(rest)
}

fn audiences_allowed(configured: &[String], token: &[String]) -> bool {
    if configured.is_empty() {
        return true;
    }
    token.iter().any(|aud| {
        let aud = sanitize_audience(aud);
        configured.iter().any(|c| sanitize_audience(c) == aud)
    })
}

/// Which algorithm to check a key with. Envoy picks the procedure from the key type and only
/// the hash from the token's `alg`; combinations our crypto backend cannot express (ES512,
/// or a curve/hash mix) can never verify.
fn verification_alg(jwt_alg: &str, material: &KeyMaterial) -> Option<Algorithm> {
    match material {
        KeyMaterial::Rsa(..) => match jwt_alg {
            "RS256" => Some(Algorithm::RS256),
            "RS384" => Some(Algorithm::RS384),
            "RS512" => Some(Algorithm::RS512),
            "PS256" => Some(Algorithm::PS256),
            "PS384" => Some(Algorithm::PS384),
            "PS512" => Some(Algorithm::PS512),
            // An RSA key is never used with HMAC or ECDSA, which is what defeats the
            // "HS256 signed with the RSA public key" attack.
            _ => None,
        },
        KeyMaterial::Ec { curve, .. } => match (curve, jwt_alg) {
            (EcCurve::P384, "ES384") => Some(Algorithm::ES384),
            (EcCurve::P256, alg) if alg != "ES384" && alg != "ES512" => Some(Algorithm::ES256),
            // Choice: P-521/ES512 keys are accepted in a JWKS but cannot verify, because
            // jsonwebtoken 10 has no ES512; such tokens fail with "Jwt verification fails".
            _ => None,
        },
        KeyMaterial::Oct(_) => match jwt_alg {
            "HS384" => Some(Algorithm::HS384),
            "HS512" => Some(Algorithm::HS512),
            _ => Some(Algorithm::HS256),
        },
        KeyMaterial::Ed25519(_) => Some(Algorithm::EdDSA),
    }
}

fn verify_signature(jwt: &ParsedJwt<'_>, jwks: &Jwks) -> Result<(), JwtStatus> {
    // Envoy signs over the sections it split out, rejoined with a single dot.
    let signed = format!("{}.{}", jwt.header_b64, jwt.payload_b64);
    let remembered = VerifiedTokens::key(&signed, &jwt.signature);
    if jwks.verified.contains(&remembered) {
        return Ok(());
    }
    verify_with_keys(jwt, jwks, &signed)?;
    jwks.verified.insert(remembered);
    Ok(())
}

fn verify_with_keys(jwt: &ParsedJwt<'_>, jwks: &Jwks, signed: &str) -> Result<(), JwtStatus> {
    // jsonwebtoken wants the signature in canonical unpadded base64url (made only if needed).
    let mut signature: Option<String> = None;
    let mut kid_alg_matched = false;
    for key in &jwks.keys {
        if !jwt.kid.is_empty() && !key.kid.is_empty() && key.kid != jwt.kid {
            continue;
        }
        if !key.alg.is_empty() && key.alg != jwt.alg {
            continue;
        }
        // Choice (Envoy's verifier): a key counts as matching on kid and alg alone, so a
        // token whose alg does not fit an alg-less key's type fails with "Jwt verification
        // fails", not "no key to match".
        kid_alg_matched = true;
        let (decoding_key, ed25519) = match &key.material {
            KeyMaterial::Rsa(k, _) | KeyMaterial::Ec { key: k, .. } | KeyMaterial::Oct(k) => {
                (k, false)
            }
            KeyMaterial::Ed25519(k) => (k, true),
        };
        // Envoy stops at the first Ed25519 key when the signature length is wrong.
        if ed25519 && jwt.signature.len() != 64 {
            return Err(JwtStatus::Ed25519SignatureWrongLength);
        }
        let Some(alg) = verification_alg(&jwt.alg, &key.material) else {
            continue;
        };
        if let KeyMaterial::Rsa(_, pkcs1) = &key.material {
            if let Some(ok) = pkcs1.verify(&jwt.alg, signed.as_bytes(), &jwt.signature) {
                if ok {
                    return Ok(());
                }
                continue;
            }
        }
        let signature = signature.get_or_insert_with(|| URL_SAFE_NO_PAD.encode(&jwt.signature));
        if jsonwebtoken::crypto::verify(signature, signed.as_bytes(), decoding_key, alg)
            .unwrap_or(false)
        {
            return Ok(());
        }
    }
    Err(if kid_alg_matched {
        JwtStatus::VerificationFail
    } else {
        JwtStatus::JwksKidAlgMismatch
    })
}

/// Splits space-delimited string claims into arrays, as Istio asks Envoy to do for the
/// payload it hands to authorization.
fn normalize_payload(mut payload: Map<String, Value>, provider: &JwtProvider) -> Value {
    let names = ALWAYS_SPACE_DELIMITED
        .iter()
        .copied()
        .chain(provider.space_delimited_claims.iter().map(String::as_str));
    for name in names {
        let Some(Value::String(text)) = payload.get(name) else {
            continue;
        };
        let parts: Vec<Value> = text
            .split(' ')
            .filter(|part| !part.is_empty())
            .map(|part| Value::String(part.to_string()))
            .collect();
        // Choice: a blank string stays a string; Envoy only rewrites when it has elements.
        if !parts.is_empty() {
            payload.insert(name.to_string(), Value::Array(parts));
        }
    }
    Value::Object(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;
    const ISS: &str = "https://issuer.example.com";

    // Fixed throwaway test keys (generated with openssl for these tests only).
    const RSA_PRIVATE_PEM: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEpAIBAAKCAQEArXXcLEeG0J3dYyWtvw/u1+0gMhs7B5JOYmVWBIg3ZsTKszWE
xWaWQwqsqX4Z5wS9qWRNwMw2vVy8DhP+iUnPsR4LsHhScWDpc4r1uztflDdWuiES
q0PKXLPMlQIC+SPCYij35y7ifQxI/sKXBog8peA79IcUWXa/l+Nlcy9yQRbX+41i
QcMiWVd9M6ranM22KT96PQy+p/oF5ar7hpm2GiZ0EWl8DIJlDPpiP+dZpzsifjY6
Lv8ntv2DqoSfkRqA1arIgGC+rRJgLMTKJRephN5lgXE0IiyE/ERNRISb1AEJ9hox
axR6HQkvkGH7qGkKcAtwu+zj9gIlto/r+G/vFQIDAQABAoIBAFQd1JBwezMNav+a
lQATVOrHJhbGV8DbNUHIDIeUGvGuOvHe4SztC68lLQfgi+UYynSrnH0DSwRXRSa6
kXO4JIyqmlaQcsJikbMjTvjl2PrCPz9xrGD7NdXwpyQXXqO8sJXzcgxdEx465+cL
LDvRsz9pVwnEu5yK1mxsrJTIDGr9QWU+NQ0ty0H1tO+/oEthmZAVlwOUdH8R6hhQ
j+wRWDDGZ5QvpSawbsB0T6P0rW7pKh9r8wiDoIY5tQbBlasNB0iSVkNguMf4gTjE
oAFcGuIweqIUB55v1LIMs98gF98pIXjYMC3+SSddB2pSi53DRcSkzNtqRyQpw/E0
qV3OuN0CgYEA2w+NE88bGQrnnviSd90Cg+lLV/v3nD5XKuwkUCAKvaRKCbF0ZYss
cwwzzZ43SxBNjjap1yUCMR9hYl0wkuWcPT0bkhi3Cqmv1eGf57kvFUqhUuCNvBuc
2fcq5/k2RpcUxNYF/fpIjwB9DaQotOtCNO8eMb9inpTL/MoyA8d2e0sCgYEAyrXT
W0Cegv03qQXnGJf4VGHGoS1wvJmDNJgeP78v2HC3j3rkVJ2YsdIYgi7mTA2yMlD9
CL7P941ONffA965hID7FoFDoRB0mphbuljAbOkok/1cKt0M+smQtwGpHOnXv5dVW
jxMD2A5QALVormXX0zVltNjtZJb9BBRSzWubYx8CgYEArUEiai1eGDNYt5GPfj+N
Mrk7/s1oq+leVbNIkRqWhCDA8eOo1Hr7X86h1hkxUCwHutefAmrhzeoswnhD55q0
NHb1LFphwowsZrO5HbOH+oX5C6xQTRtltbpX8/pVpATvxzIisRnXc0qGnVhdXaHH
zkfkkKH2pMe4gimE3xpNqfsCgYEAgFQFfsJ01vYZE47iEwa6NilEButucGc60cPv
emm9j2ckPdgNzqeKcCBSVa/9KW6OPh5ZYfzySYSSW8YByosBf9ldYTV3JQ/TVNg1
qKzBv/AKZf+jkAspGOQktqhReWgKPFUHnEHscA33hctSfv2IWXR3c7rU5pZTjQ6U
sOkLkP8CgYB27an9k2JxlvYZZHOL28PA16AC8E4CqvOiqQCDNlU/GAH5oefOAJqb
PKfaAQsXYU0z78FVWKA+lxq6ibkjkx95B+ZVN30QJo6BgdOD+jovJCslx2HNFIWR
03obJSsxd5dEKQ9c2Ez1rGGYAT87P5CQHFoZaySfTPnF5UROUUyJNA==
-----END RSA PRIVATE KEY-----";
    /// SubjectPublicKeyInfo DER of the RSA key above: the bytes an attacker would use as
    /// an HMAC secret.
    const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEArXXcLEeG0J3dYyWtvw/u1+0gMhs7B5JOYmVWBIg3ZsTKszWExWaWQwqsqX4Z5wS9qWRNwMw2vVy8DhP+iUnPsR4LsHhScWDpc4r1uztflDdWuiESq0PKXLPMlQIC+SPCYij35y7ifQxI/sKXBog8peA79IcUWXa/l+Nlcy9yQRbX+41iQcMiWVd9M6ranM22KT96PQy+p/oF5ar7hpm2GiZ0EWl8DIJlDPpiP+dZpzsifjY6Lv8ntv2DqoSfkRqA1arIgGC+rRJgLMTKJRephN5lgXE0IiyE/ERNRISb1AEJ9hoxaxR6HQkvkGH7qGkKcAtwu+zj9gIlto/r+G/vFQIDAQAB
-----END PUBLIC KEY-----";
    const RSA_N: &str = "rXXcLEeG0J3dYyWtvw_u1-0gMhs7B5JOYmVWBIg3ZsTKszWExWaWQwqsqX4Z5wS9qWRNwMw2vVy8DhP-iUnPsR4LsHhScWDpc4r1uztflDdWuiESq0PKXLPMlQIC-SPCYij35y7ifQxI_sKXBog8peA79IcUWXa_l-Nlcy9yQRbX-41iQcMiWVd9M6ranM22KT96PQy-p_oF5ar7hpm2GiZ0EWl8DIJlDPpiP-dZpzsifjY6Lv8ntv2DqoSfkRqA1arIgGC-rRJgLMTKJRephN5lgXE0IiyE_ERNRISb1AEJ9hoxaxR6HQkvkGH7qGkKcAtwu-zj9gIlto_r-G_vFQ";
    const EC_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgh5VTXdSb+BNCPgoc
0YZ3WHdM+A0RcG04z4NmZ5Q1CqWhRANCAAT/6A2FttI8vfNZVzmc2SAcusnTdAXY
uBhkNBWHMDtXh4E8wyCH9O9MXvZdu+15fr+2j32KLW5ix7F/2kEBI8hS
-----END PRIVATE KEY-----";
    const EC_X: &str = "_-gNhbbSPL3zWVc5nNkgHLrJ03QF2LgYZDQVhzA7V4c";
    const EC_Y: &str = "gTzDIIf070xe9l277Xl-v7aPfYotbmLHsX_aQQEjyFI";
    const ED_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIFbTMmPmYKj7W/k2UB9XS/4NCicQqNSllZJKFU4mKDVD
-----END PRIVATE KEY-----";
    const ED_X: &str = "Si2c98kmj2uirlTkBavdnD4N41VPLeYNlzpSULkfwYo";
    /// base64url of the HMAC secret `warden-test-hmac-secret-32-bytes`.
    const OCT_K: &str = "d2FyZGVuLXRlc3QtaG1hYy1zZWNyZXQtMzItYnl0ZXM";
    const OCT_SECRET: &[u8] = b"warden-test-hmac-secret-32-bytes";

    fn pem_der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        STANDARD.decode(body).expect("test PEM")
    }

    fn rsa_jwk(kid: &str, alg: Option<&str>) -> Value {
        let mut key = json!({"kty": "RSA", "kid": kid, "n": RSA_N, "e": "AQAB"});
        if let Some(alg) = alg {
            key["alg"] = json!(alg);
        }
        key
    }

    fn jwks_of(keys: Vec<Value>) -> KeySource {
        KeySource::Inline(Jwks::parse(&json!({ "keys": keys }).to_string()).expect("test JWKS"))
    }

    fn all_keys() -> KeySource {
        jwks_of(vec![
            rsa_jwk("rsa-1", Some("RS256")),
            json!({"kty": "EC", "kid": "ec-1", "crv": "P-256", "x": EC_X, "y": EC_Y}),
            json!({"kty": "OKP", "kid": "ed-1", "crv": "Ed25519", "x": ED_X}),
            json!({"kty": "oct", "kid": "oct-1", "alg": "HS256", "k": OCT_K}),
        ])
    }

    fn provider(issuer: &str) -> JwtProvider {
        JwtProvider::new(issuer, all_keys())
    }

    fn claims() -> Value {
        json!({"iss": ISS, "sub": "user-1", "iat": NOW, "exp": NOW + 3600})
    }

    fn sign(alg: Algorithm, kid: &str, claims: &Value) -> String {
        let key = match alg {
            Algorithm::RS256 | Algorithm::PS256 => {
                EncodingKey::from_rsa_der(&pem_der(RSA_PRIVATE_PEM))
            }
            Algorithm::ES256 => EncodingKey::from_ec_der(&pem_der(EC_PRIVATE_PEM)),
            Algorithm::EdDSA => EncodingKey::from_ed_der(&pem_der(ED_PRIVATE_PEM)),
            Algorithm::HS256 => EncodingKey::from_secret(OCT_SECRET),
            other => panic!("no test key for {other:?}"),
        };
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, claims, &key).expect("test signing")
    }

    fn rs256(claims: &Value) -> String {
        sign(Algorithm::RS256, "rsa-1", claims)
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A token with arbitrary header/payload text and a dummy signature.
    fn raw_token(header: &str, payload: &str) -> String {
        format!(
            "{}.{}.{}",
            b64(header.as_bytes()),
            b64(payload.as_bytes()),
            b64(b"sig")
        )
    }

    fn hs256_with_secret(secret: &[u8], kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn bearer(token: &str) -> Vec<(String, String)> {
        vec![("authorization".to_string(), format!("Bearer {token}"))]
    }

    fn run(
        providers: &[JwtProvider],
        headers: &[(String, String)],
        query: Option<&str>,
    ) -> JwtOutcome {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let req = TokenRequest {
            method: "GET",
            headers: &headers,
            query,
        };
        authenticate(providers, &req, NOW)
    }

    fn status_of(outcome: &JwtOutcome) -> Option<JwtStatus> {
        match outcome {
            JwtOutcome::Failed { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn verified(outcome: &JwtOutcome) -> &VerifiedJwt {
        match outcome {
            JwtOutcome::Verified(v) => v,
            other => panic!("expected Verified, got {other:?}"),
        }
    }

    #[test]
    fn a_remembered_signature_skips_no_other_check() {
        let providers = [provider(ISS)];
        let token = rs256(&claims());
        // Verified once (and remembered), then again from memory.
        for _ in 0..2 {
            assert!(matches!(
                run(&providers, &bearer(&token), None),
                JwtOutcome::Verified(_)
            ));
        }
        // The same token later: still expired, memory or not.
        let auth = format!("Bearer {token}");
        let headers = [("authorization", auth.as_str())];
        let req = TokenRequest {
            method: "GET",
            headers: &headers,
            query: None,
        };
        assert_eq!(
            status_of(&authenticate(&providers, &req, NOW + 7200)),
            Some(JwtStatus::Expired)
        );
        // Another signature over the same header and payload is checked, not remembered.
        let (signed, _) = token.rsplit_once('.').unwrap();
        let forged = format!("{signed}.{}", b64(&[7u8; 256]));
        assert_eq!(
            status_of(&run(&providers, &bearer(&forged), None)),
            Some(JwtStatus::VerificationFail)
        );
        // A key set parsed anew (a config change) remembers nothing from the old one.
        let fresh = [provider(ISS)];
        assert!(matches!(
            run(&fresh, &bearer(&token), None),
            JwtOutcome::Verified(_)
        ));
    }

    #[test]
    fn status_messages_and_codes() {
        let cases = [
            (JwtStatus::Missing, "Jwt is missing"),
            (JwtStatus::NotYetValid, "Jwt not yet valid"),
            (JwtStatus::Expired, "Jwt is expired"),
            (
                JwtStatus::BadFormat,
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
            ),
            (JwtStatus::UnknownIssuer, "Jwt issuer is not configured"),
            (
                JwtStatus::AudienceNotAllowed,
                "Audiences in Jwt are not allowed",
            ),
            (JwtStatus::JwksFetchFail, "Jwks remote fetch is failed"),
            (
                JwtStatus::JwksNoValidKeys,
                "Jwks doesn't have any valid public key",
            ),
        ];
        for (status, text) in cases {
            assert_eq!(status.message(), text);
            assert_eq!(status.to_string(), text);
        }
        assert_eq!(JwtStatus::AudienceNotAllowed.http_status(), 403);
        assert_eq!(JwtStatus::VerificationFail.http_status(), 401);
        assert_eq!(JwtStatus::Missing.http_status(), 401);
    }

    #[test]
    fn format_and_claim_type_errors() {
        let hdr = r#"{"alg":"RS256","kid":"rsa-1"}"#;
        let good_payload = claims().to_string();
        let cases: Vec<(String, JwtStatus)> = vec![
            ("onlyone".into(), JwtStatus::BadFormat),
            ("a.b".into(), JwtStatus::BadFormat),
            ("a.b.c.d".into(), JwtStatus::BadFormat),
            ("a..".into(), JwtStatus::BadFormat),
            ("e3!0.e30.c2ln".into(), JwtStatus::HeaderBadBase64),
            (
                format!("{}.e30.c2ln", b64(b"not json")),
                JwtStatus::HeaderBadJson,
            ),
            (raw_token("[1]", &good_payload), JwtStatus::HeaderBadJson),
            (raw_token("{}", &good_payload), JwtStatus::HeaderBadAlg),
            (
                raw_token(r#"{"alg":256}"#, &good_payload),
                JwtStatus::HeaderBadAlg,
            ),
            (
                raw_token(r#"{"alg":"none"}"#, &good_payload),
                JwtStatus::HeaderNotImplementedAlg,
            ),
            (
                raw_token(r#"{"alg":"RS256","kid":7}"#, &good_payload),
                JwtStatus::HeaderBadKid,
            ),
            (
                format!("{}.!!!.c2ln", b64(hdr.as_bytes())),
                JwtStatus::PayloadBadBase64,
            ),
            (raw_token(hdr, "nope"), JwtStatus::PayloadBadJson),
            (raw_token(hdr, r#"{"iss":1}"#), JwtStatus::IssNotString),
            (raw_token(hdr, r#"{"iss":null}"#), JwtStatus::IssNotString),
            (raw_token(hdr, r#"{"sub":true}"#), JwtStatus::SubNotString),
            (raw_token(hdr, r#"{"iat":"1"}"#), JwtStatus::IatNotInteger),
            (raw_token(hdr, r#"{"iat":-1}"#), JwtStatus::IatOutOfRange),
            (raw_token(hdr, r#"{"nbf":"1"}"#), JwtStatus::NbfNotInteger),
            (raw_token(hdr, r#"{"nbf":-5}"#), JwtStatus::NbfOutOfRange),
            (raw_token(hdr, r#"{"exp":[1]}"#), JwtStatus::ExpNotInteger),
            (raw_token(hdr, r#"{"exp":1e30}"#), JwtStatus::ExpOutOfRange),
            (raw_token(hdr, r#"{"jti":5}"#), JwtStatus::JtiNotString),
            (raw_token(hdr, r#"{"aud":5}"#), JwtStatus::AudNotString),
            (
                raw_token(hdr, r#"{"aud":["a",5]}"#),
                JwtStatus::AudNotString,
            ),
            (
                format!(
                    "{}.{}.!!!",
                    b64(hdr.as_bytes()),
                    b64(good_payload.as_bytes())
                ),
                JwtStatus::SignatureBadBase64,
            ),
        ];
        for (token, expected) in cases {
            let outcome = run(&[provider("")], &bearer(&token), None);
            assert_eq!(status_of(&outcome), Some(expected), "token {token}");
        }
    }

    #[test]
    fn default_locations_header_and_access_token_param() {
        let token = rs256(&claims());
        let p = [provider(ISS)];
        assert!(matches!(
            run(&p, &bearer(&token), None),
            JwtOutcome::Verified(_)
        ));
        let query = format!("x=1&access_token={token}");
        assert!(matches!(
            run(&p, &[], Some(&query)),
            JwtOutcome::Verified(_)
        ));
        // Any configured location replaces both defaults.
        let mut custom = provider(ISS);
        custom.from_params = vec!["jwt".into()];
        assert_eq!(
            run(&[custom.clone()], &bearer(&token), None),
            JwtOutcome::NoToken
        );
        let query = format!("jwt={token}");
        assert!(matches!(
            run(&[custom], &[], Some(&query)),
            JwtOutcome::Verified(_)
        ));
    }

    #[test]
    fn custom_header_with_and_without_prefix() {
        let token = rs256(&claims());
        let mut prefixed = provider(ISS);
        prefixed.from_headers = vec![HeaderLocation {
            name: "X-Jwt-Assertion".into(),
            prefix: "Token ".into(),
        }];
        let headers = vec![("x-jwt-assertion".to_string(), format!("Token {token}"))];
        assert!(matches!(
            run(&[prefixed.clone()], &headers, None),
            JwtOutcome::Verified(_)
        ));
        let wrong = vec![("x-jwt-assertion".to_string(), token.clone())];
        assert_eq!(run(&[prefixed], &wrong, None), JwtOutcome::NoToken);

        let mut bare = provider(ISS);
        bare.from_headers = vec![HeaderLocation {
            name: "x-jwt".into(),
            prefix: String::new(),
        }];
        let headers = vec![("x-jwt".to_string(), token)];
        assert!(matches!(
            run(&[bare], &headers, None),
            JwtOutcome::Verified(_)
        ));
    }

    #[test]
    fn prefix_matching_follows_envoy() {
        let token = rs256(&claims());
        let p = [provider(ISS)];
        let no_token = [
            format!("bearer {token}"),
            format!("Basic {}", STANDARD.encode("user:pass")),
            token.clone(),
        ];
        for value in no_token {
            let headers = vec![("authorization".to_string(), value)];
            assert_eq!(run(&p, &headers, None), JwtOutcome::NoToken);
        }
        // The prefix may appear anywhere and extra separators before the token are skipped.
        for value in [format!("Foo Bearer {token}"), format!("Bearer   {token}")] {
            let headers = vec![("authorization".to_string(), value)];
            assert!(matches!(run(&p, &headers, None), JwtOutcome::Verified(_)));
        }
        // Nothing after the prefix: Envoy falls back to the whole value, which is malformed.
        let headers = vec![("authorization".to_string(), "Bearer ".to_string())];
        assert_eq!(
            status_of(&run(&p, &headers, None)),
            Some(JwtStatus::BadFormat)
        );
    }

    #[test]
    fn cookie_location() {
        let token = rs256(&claims());
        let mut p = provider(ISS);
        p.from_cookies = vec!["session".into()];
        let plain = vec![("cookie".to_string(), format!("a=b; session={token}; c=d"))];
        assert!(matches!(
            run(&[p.clone()], &plain, None),
            JwtOutcome::Verified(_)
        ));
        let quoted = vec![("cookie".to_string(), format!("session=\"{token}\""))];
        assert!(matches!(
            run(&[p.clone()], &quoted, None),
            JwtOutcome::Verified(_)
        ));
        let other = vec![("cookie".to_string(), format!("sess={token}"))];
        assert_eq!(run(&[p], &other, None), JwtOutcome::NoToken);
    }

    #[test]
    fn time_checks_with_skew() {
        let with = |extra: Value| {
            let mut c = json!({"iss": ISS, "sub": "s"});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            status_of(&run(&[provider(ISS)], &bearer(&rs256(&c)), None))
        };
        assert_eq!(with(json!({"nbf": NOW + 60})), None);
        assert_eq!(with(json!({"nbf": NOW + 61})), Some(JwtStatus::NotYetValid));
        assert_eq!(with(json!({"exp": NOW - 60})), None);
        assert_eq!(with(json!({"exp": NOW - 61})), Some(JwtStatus::Expired));
        assert_eq!(with(json!({})), None, "no exp never expires");
        assert_eq!(with(json!({"exp": 0})), None, "exp 0 reads as absent");
        assert_eq!(
            with(json!({"exp": (NOW - 61) as f64 + 0.9})),
            Some(JwtStatus::Expired)
        );
    }

    #[test]
    fn audiences() {
        let check = |configured: &[&str], aud: Value| {
            let mut p = provider(ISS);
            p.audiences = configured.iter().map(|s| s.to_string()).collect();
            let mut c = claims();
            if !aud.is_null() {
                c["aud"] = aud;
            }
            status_of(&run(&[p], &bearer(&rs256(&c)), None))
        };
        let denied = Some(JwtStatus::AudienceNotAllowed);
        assert_eq!(check(&["svc"], json!("https://svc/")), None);
        assert_eq!(check(&["https://svc/"], json!("svc")), None);
        assert_eq!(check(&["http://svc"], json!("svc/")), None);
        assert_eq!(check(&["svc"], json!(["other", "svc"])), None);
        assert_eq!(check(&["svc"], json!(["other"])), denied);
        assert_eq!(check(&["svc"], Value::Null), denied);
        assert_eq!(check(&["svc"], json!("svc//")), denied);
        assert_eq!(check(&[], json!("anything")), None);
        assert_eq!(JwtStatus::AudienceNotAllowed.http_status(), 403);
    }

    #[test]
    fn issuer_rules() {
        let mut c = claims();
        c["iss"] = json!("https://someone-else");
        let token = rs256(&c);
        let outcome = run(&[provider(ISS)], &bearer(&token), None);
        assert_eq!(
            outcome,
            JwtOutcome::Failed {
                status: JwtStatus::UnknownIssuer,
                provider_issuer: Some(ISS.to_string())
            }
        );
        assert_eq!(outcome.http_status(), Some(401));
        // An empty issuer accepts any issuer, including none.
        assert!(matches!(
            run(&[provider("")], &bearer(&token), None),
            JwtOutcome::Verified(_)
        ));
        let no_iss = rs256(&json!({"sub": "s"}));
        assert!(matches!(
            run(&[provider("")], &bearer(&no_iss), None),
            JwtOutcome::Verified(_)
        ));
        assert_eq!(
            status_of(&run(&[provider(ISS)], &bearer(&no_iss), None)),
            Some(JwtStatus::UnknownIssuer)
        );
    }

    #[test]
    fn two_providers_sharing_the_default_header() {
        let a = provider("issuer-a");
        let b = provider("issuer-b");
        let providers = [a, b];
        let mut c = claims();
        c["iss"] = json!("issuer-b");
        let outcome = run(&providers, &bearer(&rs256(&c)), None);
        assert_eq!(verified(&outcome).provider_issuer, "issuer-b");

        c["iss"] = json!("issuer-c");
        let outcome = run(&providers, &bearer(&rs256(&c)), None);
        assert_eq!(status_of(&outcome), Some(JwtStatus::UnknownIssuer));

        // B's real failure is preferred over A's issuer mismatch.
        c["iss"] = json!("issuer-b");
        c["exp"] = json!(NOW - 1000);
        let outcome = run(&providers, &bearer(&rs256(&c)), None);
        assert_eq!(
            outcome,
            JwtOutcome::Failed {
                status: JwtStatus::Expired,
                provider_issuer: Some("issuer-b".into())
            }
        );
        assert_eq!(run(&providers, &[], None), JwtOutcome::NoToken);
    }

    #[test]
    fn multi_provider_status_choice_follows_envoy() {
        // A: header x-a; B: header x-b; C: header x-c. A sees another issuer's token, B and
        // C fail for real reasons: Envoy reports the last real failure (C).
        let located = |iss: &str, header: &str| {
            let mut p = provider(iss);
            p.from_headers = vec![HeaderLocation {
                name: header.into(),
                prefix: String::new(),
            }];
            p
        };
        let providers = [
            located("a", "x-a"),
            located("b", "x-b"),
            located("c", "x-c"),
        ];
        let tok = |iss: &str, exp: i64| rs256(&json!({"iss": iss, "exp": exp}));
        let headers = vec![
            ("x-a".to_string(), tok("z", NOW + 100)),
            ("x-b".to_string(), tok("b", NOW - 1000)),
            ("x-c".to_string(), "garbage".to_string()),
        ];
        let outcome = run(&providers, &headers, None);
        assert_eq!(
            outcome,
            JwtOutcome::Failed {
                status: JwtStatus::BadFormat,
                provider_issuer: Some("c".into())
            }
        );
        // When the first failing provider has a real error, its status wins.
        let headers = vec![
            ("x-a".to_string(), tok("a", NOW - 1000)),
            ("x-c".to_string(), "garbage".to_string()),
        ];
        assert_eq!(
            status_of(&run(&providers, &headers, None)),
            Some(JwtStatus::Expired)
        );
        // Any success wins even if another provider fails.
        let headers = vec![
            ("x-a".to_string(), "garbage".to_string()),
            ("x-b".to_string(), tok("b", NOW + 100)),
        ];
        assert_eq!(
            verified(&run(&providers, &headers, None)).provider_issuer,
            "b"
        );
    }

    #[test]
    fn every_token_of_a_provider_must_verify() {
        let token = rs256(&claims());
        let p = [provider(ISS)];
        let query = "access_token=bad.token.here";
        assert!(status_of(&run(&p, &bearer(&token), Some(query))).is_some());
        let query = format!("access_token={token}");
        assert!(matches!(
            run(&p, &bearer(&token), Some(&query)),
            JwtOutcome::Verified(_)
        ));
    }

    #[test]
    fn alg_none_and_hmac_with_rsa_public_key_are_rejected() {
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(claims().to_string().as_bytes())
        );
        assert_eq!(
            status_of(&run(&[provider(ISS)], &bearer(&none), None)),
            Some(JwtStatus::BadFormat)
        );
        let none_sig = format!("{none}c2ln");
        assert_eq!(
            status_of(&run(&[provider(ISS)], &bearer(&none_sig), None)),
            Some(JwtStatus::HeaderNotImplementedAlg)
        );

        // HS256 "signed" with the RSA public key (as DER, as PEM text, and as raw n).
        let secrets: [Vec<u8>; 3] = [
            pem_der(RSA_PUBLIC_PEM),
            RSA_PUBLIC_PEM.as_bytes().to_vec(),
            RSA_N.as_bytes().to_vec(),
        ];
        for secret in &secrets {
            let forged = hs256_with_secret(secret, "rsa-1", &claims());
            let with_alg = JwtProvider::new(ISS, jwks_of(vec![rsa_jwk("rsa-1", Some("RS256"))]));
            assert_eq!(
                status_of(&run(&[with_alg], &bearer(&forged), None)),
                Some(JwtStatus::JwksKidAlgMismatch)
            );
            let without_alg = JwtProvider::new(ISS, jwks_of(vec![rsa_jwk("rsa-1", None)]));
            assert_eq!(
                status_of(&run(&[without_alg], &bearer(&forged), None)),
                Some(JwtStatus::VerificationFail)
            );
        }
    }

    #[test]
    fn kid_and_alg_matching() {
        let p = [provider(ISS)];
        let wrong_kid = sign(Algorithm::RS256, "unknown", &claims());
        assert_eq!(
            status_of(&run(&p, &bearer(&wrong_kid), None)),
            Some(JwtStatus::JwksKidAlgMismatch)
        );
        // A key without a kid is tried for any token kid.
        let no_kid = JwtProvider::new(
            ISS,
            jwks_of(vec![json!({"kty": "RSA", "n": RSA_N, "e": "AQAB"})]),
        );
        assert!(matches!(
            run(&[no_kid], &bearer(&wrong_kid), None),
            JwtOutcome::Verified(_)
        ));
        // A token without a kid is tried against every key.
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims(),
            &EncodingKey::from_rsa_der(&pem_der(RSA_PRIVATE_PEM)),
        )
        .unwrap();
        assert!(matches!(
            run(&p, &bearer(&token), None),
            JwtOutcome::Verified(_)
        ));
    }

    #[test]
    fn valid_tokens_for_each_key_type() {
        let p = [provider(ISS)];
        for (alg, kid) in [
            (Algorithm::RS256, "rsa-1"),
            (Algorithm::ES256, "ec-1"),
            (Algorithm::EdDSA, "ed-1"),
            (Algorithm::HS256, "oct-1"),
        ] {
            let token = sign(alg, kid, &claims());
            let outcome = run(&p, &bearer(&token), None);
            assert_eq!(verified(&outcome).subject(), Some("user-1"), "{alg:?}");
        }
        let ps = JwtProvider::new(ISS, jwks_of(vec![rsa_jwk("rsa-1", None)]));
        let token = sign(Algorithm::PS256, "rsa-1", &claims());
        assert!(matches!(
            run(&[ps], &bearer(&token), None),
            JwtOutcome::Verified(_)
        ));
    }

    #[test]
    fn corrupted_signatures() {
        let p = [provider(ISS)];
        for (alg, kid) in [(Algorithm::RS256, "rsa-1"), (Algorithm::ES256, "ec-1")] {
            let token = sign(alg, kid, &claims());
            let (body, sig) = token.rsplit_once('.').unwrap();
            let mut bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
            bytes[5] ^= 0x01;
            let forged = format!("{body}.{}", b64(&bytes));
            assert_eq!(
                status_of(&run(&p, &bearer(&forged), None)),
                Some(JwtStatus::VerificationFail)
            );
        }
        // Payload swapped under a valid signature.
        let token = rs256(&claims());
        let parts: Vec<&str> = token.split('.').collect();
        let mut c = claims();
        c["sub"] = json!("admin");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(c.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(
            status_of(&run(&p, &bearer(&forged), None)),
            Some(JwtStatus::VerificationFail)
        );
        // Ed25519 signature of the wrong length is its own status.
        let token = sign(Algorithm::EdDSA, "ed-1", &claims());
        let (body, _) = token.rsplit_once('.').unwrap();
        let short = format!("{body}.{}", b64(&[1u8; 10]));
        assert_eq!(
            status_of(&run(&p, &bearer(&short), None)),
            Some(JwtStatus::Ed25519SignatureWrongLength)
        );
    }

    #[test]
    fn es512_with_p521_key_cannot_verify() {
        let p521 = JwtProvider::new(
            ISS,
            jwks_of(vec![
                json!({"kty": "EC", "crv": "P-521", "x": "AQ", "y": "AQ"}),
            ]),
        );
        let token = format!(
            "{}.{}.{}",
            b64(br#"{"alg":"ES512"}"#),
            b64(claims().to_string().as_bytes()),
            b64(&[7u8; 132])
        );
        assert_eq!(
            status_of(&run(&[p521], &bearer(&token), None)),
            Some(JwtStatus::VerificationFail)
        );
    }

    #[test]
    fn space_delimited_claims_principal_and_nested_claims() {
        let mut p = provider(ISS);
        p.space_delimited_claims = vec!["roles".into()];
        let c = json!({
            "iss": ISS, "sub": "user-1", "scope": "read  write", "permission": "p1",
            "roles": "a b", "other": "x y", "blank": " ", "nested": {"k": {"v": 3}},
        });
        let outcome = run(&[p], &bearer(&rs256(&c)), None);
        let v = verified(&outcome);
        assert_eq!(v.payload["scope"], json!(["read", "write"]));
        assert_eq!(v.payload["permission"], json!(["p1"]));
        assert_eq!(v.payload["roles"], json!(["a", "b"]));
        assert_eq!(v.payload["other"], json!("x y"));
        assert_eq!(v.issuer(), Some(ISS));
        assert_eq!(v.request_principal(), Some(format!("{ISS}/user-1")));
        assert_eq!(v.claim(&["nested", "k", "v"]), Some(&json!(3)));
        assert_eq!(v.claim(&["nested", "missing"]), None);
        assert_eq!(v.claim(&["sub", "x"]), None);

        let no_sub = run(
            &[provider(ISS)],
            &bearer(&rs256(&json!({"iss": ISS}))),
            None,
        );
        assert_eq!(verified(&no_sub).request_principal(), None);
    }

    #[test]
    fn cors_preflight_skips_jwt() {
        let mut headers = bearer("garbage");
        headers.push(("origin".into(), "https://app".into()));
        headers.push(("access-control-request-method".into(), "POST".into()));
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let req = TokenRequest {
            method: "OPTIONS",
            headers: &headers,
            query: None,
        };
        assert_eq!(
            authenticate(&[provider(ISS)], &req, NOW),
            JwtOutcome::NoToken
        );
        // Without the request-method header it is a plain OPTIONS request.
        let req = TokenRequest {
            method: "OPTIONS",
            headers: &headers[..2],
            query: None,
        };
        assert_eq!(
            status_of(&authenticate(&[provider(ISS)], &req, NOW)),
            Some(JwtStatus::BadFormat)
        );
    }

    #[test]
    fn key_source_states() {
        let token = rs256(&claims());
        let unavailable = JwtProvider::new(
            ISS,
            KeySource::Unavailable {
                reason: "connection refused".into(),
            },
        );
        assert_eq!(
            status_of(&run(&[unavailable], &bearer(&token), None)),
            Some(JwtStatus::JwksFetchFail)
        );
        let invalid = JwtProvider::new(ISS, KeySource::from_jwks_json("not json"));
        assert_eq!(
            status_of(&run(&[invalid], &bearer(&token), None)),
            Some(JwtStatus::JwksNoValidKeys)
        );
        // Issuer and time are checked before keys are needed.
        let unavailable = JwtProvider::new(
            ISS,
            KeySource::Unavailable {
                reason: String::new(),
            },
        );
        let expired = rs256(&json!({"iss": ISS, "exp": NOW - 1000}));
        assert_eq!(
            status_of(&run(&[unavailable], &bearer(&expired), None)),
            Some(JwtStatus::Expired)
        );
    }

    #[test]
    fn huge_token_is_rejected_as_malformed() {
        let part = "a".repeat(512 * 1024);
        let token = format!("{part}.{part}.sig");
        let outcome = run(&[provider(ISS)], &bearer(&token), None);
        assert_eq!(status_of(&outcome), Some(JwtStatus::BadFormat));
        let query = format!("access_token={token}");
        let outcome = run(&[provider(ISS)], &[], Some(&query));
        assert_eq!(status_of(&outcome), Some(JwtStatus::BadFormat));
    }

    #[test]
    fn query_parsing() {
        let token = rs256(&claims());
        let p = [provider(ISS)];
        // First occurrence wins; percent-encoding is decoded.
        let query = format!("access_token={token}&access_token=bad");
        assert!(matches!(
            run(&p, &[], Some(&query)),
            JwtOutcome::Verified(_)
        ));
        let encoded = token.replace('.', "%2E");
        let query = format!("access_token={encoded}#frag");
        assert!(matches!(
            run(&p, &[], Some(&query)),
            JwtOutcome::Verified(_)
        ));
        assert_eq!(run(&p, &[], Some("other=1&&")), JwtOutcome::NoToken);
        assert_eq!(
            status_of(&run(&p, &[], Some("access_token"))),
            Some(JwtStatus::BadFormat)
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("a%2Fb%"), "a/b%");
    }

    #[test]
    fn lenient_base64_like_absl() {
        assert_eq!(decode_b64url("aGk"), Some(b"hi".to_vec()));
        assert_eq!(decode_b64url("aGk="), Some(b"hi".to_vec()));
        assert_eq!(decode_b64url("aG k"), Some(b"hi".to_vec()));
        assert_eq!(decode_b64url("aGk=="), None);
        assert_eq!(decode_b64url("a"), None);
        assert_eq!(decode_b64url("a+b/"), None);
        assert_eq!(decode_b64url(""), Some(Vec::new()));
    }

    #[test]
    fn jwks_parse_junk_and_key_rules() {
        let junk = [
            ("", JwksError::InvalidJson),
            ("{", JwksError::InvalidJson),
            ("[]", JwksError::InvalidJson),
            ("\u{0}\u{ff}", JwksError::InvalidJson),
            ("{}", JwksError::NoKeys),
            (r#"{"keys": {}}"#, JwksError::BadKeys),
        ];
        for (input, expected) in junk {
            assert_eq!(Jwks::parse(input).unwrap_err(), expected, "{input:?}");
        }
        let no_valid = [
            r#"{"keys": []}"#,
            r#"{"keys": [1, "x", null]}"#,
            r#"{"keys": [{"kid": "x"}]}"#,
            r#"{"keys": [{"kty": "XYZ"}]}"#,
            r#"{"keys": [{"kty": "RSA", "n": "AQAB"}]}"#,
            r#"{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}"#,
            r#"{"keys": [{"kty": "RSA", "alg": "HS256", "n": "AQAB", "e": "AQAB"}]}"#,
            r#"{"keys": [{"kty": "EC", "alg": "ES256", "crv": "P-384", "x": "AQ", "y": "AQ"}]}"#,
            r#"{"keys": [{"kty": "EC", "crv": "P-999", "x": "AQ", "y": "AQ"}]}"#,
            r#"{"keys": [{"kty": "oct", "k": ""}]}"#,
            r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AQ"}]}"#,
            r#"{"keys": [{"kty": "OKP", "crv": "X25519", "x": "AQ"}]}"#,
        ];
        for input in no_valid {
            assert!(
                matches!(Jwks::parse(input), Err(JwksError::NoValidKeys { .. })),
                "{input}"
            );
        }
        let rsa_e3 = json!({"keys": [{"kty": "RSA", "n": RSA_N, "e": "Aw"}]});
        assert!(Jwks::parse(&rsa_e3.to_string()).is_ok());
        let rsa_e5 = json!({"keys": [{"kty": "RSA", "n": RSA_N, "e": "BQ"}]});
        assert!(Jwks::parse(&rsa_e5.to_string()).is_err());
        // A bad key is skipped when a good one remains.
        let mixed = json!({"keys": [{"kty": "RSA"}, rsa_jwk("rsa-1", None)]});
        assert_eq!(Jwks::parse(&mixed.to_string()).unwrap().len(), 1);

        assert!(!Jwks::has_private_material("junk"));
        assert!(!Jwks::has_private_material(&mixed.to_string()));
        let private = json!({"keys": [{"kty": "RSA", "n": RSA_N, "e": "AQAB", "d": "AQ"}]});
        assert!(Jwks::has_private_material(&private.to_string()));
        let oct = json!({"keys": [{"kty": "oct", "k": OCT_K}]});
        assert!(!Jwks::has_private_material(&oct.to_string()));
    }
}
