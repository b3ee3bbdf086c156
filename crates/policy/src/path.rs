//! Request paths as the Istio sidecar sees them before authorization runs.
//!
//! This module owns four things, all pure string work with no I/O:
//!
//! * splitting an HTTP request target into path and query, dropping any
//!   `#fragment` ([`split_request_target`]);
//! * reproducing the path rewriting Envoy's HTTP connection manager applies
//!   for each `meshConfig.pathNormalization.normalization` mode
//!   ([`Normalization`], [`normalize`]), byte for byte, including the quirks of
//!   the Chromium path canonicalizer Envoy embeds;
//! * matching AuthorizationPolicy path templates (`{*}` / `{**}`) the way
//!   Envoy's `uri_template` matcher does ([`PathTemplate`]);
//! * Istio's admission-time validation of `paths` / `notPaths` values
//!   ([`validate_path_value`]).
//!
//! Fidelity to the sidecar matters more than RFC purity here: a policy that
//! is evaluated on a path spelled differently from the one Envoy would
//! evaluate is an authorization bypass.

use std::borrow::Cow;

/// Why a request path was refused, or a path template could not be compiled.
///
/// A refused request never reaches policy evaluation; see
/// [`PathError::http_status`] for the status Envoy answers with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The `:path` is empty.
    #[error("request path is empty")]
    Empty,
    /// The `:path` does not start with `/` (absolute-form or asterisk-form
    /// targets are not served at the application layer).
    #[error("request path must start with '/'")]
    NotAbsolute,
    /// The path contains a NUL byte, literally or as `%00`.
    #[error("request path contains a NUL byte (literal or %00)")]
    NulByte,
    /// A path template could not be parsed.
    #[error("invalid path template {template:?}: {reason}")]
    InvalidTemplate {
        /// The template as written in the policy.
        template: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl PathError {
    /// The HTTP status Envoy's connection manager sends for this error.
    ///
    /// Choice: empty and non-`/` paths get 404, not 400. Envoy checks these in
    /// `ConnectionManagerImpl::ActiveStream::decodeHeaders` *before* and
    /// independently of normalization (details `missing_path` /
    /// `absolute_path`), so it applies even with normalization `NONE`.
    /// Source: envoy `source/common/http/conn_manager_impl.cc`.
    /// Canonicalization failures are answered with 400 (`path_normalization_failed`).
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Empty | Self::NotAbsolute => 404,
            Self::NulByte | Self::InvalidTemplate { .. } => 400,
        }
    }
}

// ---------------------------------------------------------------------------
// Request target splitting
// ---------------------------------------------------------------------------

/// Splits a request target into `(path, query)`, dropping any fragment.
///
/// The query is returned without its leading `?`; `Some("")` means a bare
/// `?` was present. Istio configures Envoy to strip (not reject) a fragment,
/// and a `#` ends the query as well as the path, so `/x#a?b` has no query.
pub fn split_request_target(raw: &str) -> (&str, Option<&str>) {
    let without_fragment = match raw.find('#') {
        Some(hash) => &raw[..hash],
        None => raw,
    };
    match without_fragment.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (without_fragment, None),
    }
}

// ---------------------------------------------------------------------------
// Normalization modes
// ---------------------------------------------------------------------------

/// `meshConfig.pathNormalization.normalization`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Normalization {
    /// `normalize_path=false`: the raw path is evaluated and forwarded.
    None,
    /// `normalize_path=true` (Chromium canonicalization), slashes untouched.
    #[default]
    Base,
    /// [`Normalization::Base`] plus `merge_slashes=true`.
    MergeSlashes,
    /// [`Normalization::MergeSlashes`] plus
    /// `path_with_escaped_slashes_action=UNESCAPE_AND_FORWARD`.
    DecodeAndMergeSlashes,
}

impl Normalization {
    /// Parses the mesh config enum name; `DEFAULT` is an alias of `BASE`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "NONE" => Some(Self::None),
            "BASE" | "DEFAULT" => Some(Self::Base),
            "MERGE_SLASHES" => Some(Self::MergeSlashes),
            "DECODE_AND_MERGE_SLASHES" => Some(Self::DecodeAndMergeSlashes),
            _ => None,
        }
    }

    /// Whether Envoy's `normalize_path` (Chromium canonicalization) is on.
    pub const fn canonicalizes(self) -> bool {
        !matches!(self, Self::None)
    }

    /// Whether Envoy's `merge_slashes` is on.
    pub const fn merges_slashes(self) -> bool {
        matches!(self, Self::MergeSlashes | Self::DecodeAndMergeSlashes)
    }

    /// Whether `%2F`/`%5C` are decoded before canonicalization.
    pub const fn decodes_escaped_slashes(self) -> bool {
        matches!(self, Self::DecodeAndMergeSlashes)
    }
}

/// Rewrites a request path the way the sidecar would before routing and
/// authorization.
///
/// `path` is the path component only (see [`split_request_target`]); a `?`
/// inside it is treated as a path character, exactly as Chromium would.
/// Returns `Cow::Borrowed` when nothing changes, which is the common case.
///
/// Choice: the order is (1) unescape `%2F`/`%5C`, (2) canonicalize,
/// (3) merge slashes, each applied once, matching envoy
/// `ConnectionManagerUtility::maybeNormalizePath`
/// (`source/common/http/conn_manager_utility.cc`). Because each step is a
/// single pass, `%252F` is never turned into `/`.
pub fn normalize(path: &str, mode: Normalization) -> Result<Cow<'_, str>, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Choice: a literal NUL is refused in every mode, including NONE. Envoy's
    // codecs reject NUL in header values before the connection manager runs
    // (RFC 9110 §5.5); with normalization on, Chromium's table marks it
    // INVALID too (envoy `source/common/chromium_url/url_canon_path.cc`).
    if path.as_bytes().contains(&0) {
        return Err(PathError::NulByte);
    }
    if !mode.canonicalizes() {
        return Ok(Cow::Borrowed(path));
    }

    let mut current = Cow::Borrowed(path);
    if mode.decodes_escaped_slashes() {
        if let Some(unescaped) = unescape_slashes(&current) {
            current = Cow::Owned(unescaped);
        }
    }
    if let Some(canonical) = canonicalize(&current)? {
        current = Cow::Owned(canonical);
    }
    if mode.merges_slashes() {
        if let Some(merged) = merge_slashes(&current) {
            current = Cow::Owned(merged);
        }
    }
    Ok(current)
}

/// `UNESCAPE_AND_FORWARD`: one left-to-right pass replacing `%2F`/`%2f` with
/// `/` and `%5C`/`%5c` with `\`. `None` when there is nothing to replace.
///
/// Choice: single pass with no re-scan of produced text, like envoy
/// `PathUtil::unescapeSlashes` (`source/common/http/path_utility.cc`), so
/// `%2%2F` becomes `%2/` and `%252F` is left alone.
fn unescape_slashes(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let escaped_slash_at = |i: usize| -> Option<char> {
        match bytes.get(i..i + 3)? {
            [b'%', b'2', b'F' | b'f'] => Some('/'),
            [b'%', b'5', b'C' | b'c'] => Some('\\'),
            _ => None,
        }
    };
    let first = (0..bytes.len()).find(|&i| escaped_slash_at(i).is_some())?;

    let mut out = String::with_capacity(path.len());
    out.push_str(&path[..first]);
    let mut copied_to = first;
    let mut i = first;
    while i < bytes.len() {
        if let Some(replacement) = escaped_slash_at(i) {
            out.push_str(&path[copied_to..i]);
            out.push(replacement);
            i += 3;
            copied_to = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&path[copied_to..]);
    Some(out)
}

/// `merge_slashes`: collapse runs of `/`. `None` when the result equals the
/// input.
///
/// Choice: reproduce envoy `PathTransformer::mergeSlashes`
/// (`source/common/http/path_utility.cc`) literally: keep one leading `/` if
/// present, join the non-empty segments with `/`, keep one trailing `/` if
/// present. A consequence is that `//` stays `//` and `///` becomes `//`,
/// because the leading and trailing slash are both kept around zero segments.
fn merge_slashes(path: &str) -> Option<String> {
    if !path.contains("//") {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    if path.starts_with('/') {
        out.push('/');
    }
    for (n, segment) in path.split('/').filter(|s| !s.is_empty()).enumerate() {
        if n > 0 {
            out.push('/');
        }
        out.push_str(segment);
    }
    if path.ends_with('/') {
        out.push('/');
    }
    (out != path).then_some(out)
}

// ---------------------------------------------------------------------------
// Chromium path canonicalization (Envoy `normalize_path`)
// ---------------------------------------------------------------------------

/// How Chromium treats a byte in a path, literally or after `%`-decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CharClass {
    /// Copied as is; if it arrived escaped, the escape is kept.
    Pass,
    /// Percent-encoded (uppercase hex) when literal; kept escaped when escaped.
    Escape,
    /// Decoded when it arrives escaped; copied when literal.
    Unescape,
    /// The path is refused.
    Invalid,
    /// `.`: only meaningful for dot-segment handling.
    Dot,
}

/// Choice: this is Chromium's `kPathCharLookup` table as vendored by Envoy
/// (`source/common/chromium_url/url_canon_path.cc`). Notably `"` `#` `<` `>`
/// `?` `` ` `` `^` `{` `|` `}` space, controls, DEL and all non-ASCII bytes are
/// escaped, while `[` `]` `;` `:` `@` `*` `'` and other sub-delims pass
/// through; only the unreserved set (`ALPHA DIGIT - . _ ~`) is ever decoded.
/// The googleurl build Envoy switched to (`remove_forked_chromium_url`) is
/// assumed to carry the same table.
const fn class_of(b: u8) -> CharClass {
    match b {
        0 => CharClass::Invalid,
        b'.' => CharClass::Dot,
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => CharClass::Unescape,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'/' | b':' | b';'
        | b'=' | b'@' | b'[' | b']' => CharClass::Pass,
        _ => CharClass::Escape,
    }
}

const UPPER_HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` at `at`. Like Chromium's `DecodeEscaped`, the byte at `at`
/// itself is not checked: the nested-escape repair relies on that.
fn decode_escaped(bytes: &[u8], at: usize) -> Option<u8> {
    let hi = hex_value(*bytes.get(at + 1)?)?;
    let lo = hex_value(*bytes.get(at + 2)?)?;
    Some((hi << 4) | lo)
}

fn is_url_slash(b: u8) -> bool {
    b == b'/' || b == b'\\'
}

/// Length of the dot at `at`: 1 for `.`, 3 for `%2e`/`%2E`, else 0.
///
/// Choice: `%2e` counts as a dot for dot-segment removal, so `/a/%2e%2e/b`
/// is `/b` (Chromium `IsDot`, envoy `source/common/chromium_url/url_canon_internal.h`).
fn dot_len(bytes: &[u8], at: usize) -> usize {
    match bytes.get(at..) {
        Some([b'.', ..]) => 1,
        Some([b'%', b'2', b'e' | b'E', ..]) => 3,
        _ => 0,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DotSegment {
    /// Part of a file name such as `.well-known` or `...`.
    NotADirectory,
    /// `.`; carries how many input bytes after the dot belong to it.
    Current(usize),
    /// `..`; carries how many input bytes after the first dot belong to it.
    Up(usize),
}

/// Chromium `ClassifyAfterDot`. A backslash terminates a dot segment just
/// like `/` does.
fn classify_after_dot(bytes: &[u8], after_dot: usize) -> DotSegment {
    let end = bytes.len();
    if after_dot == end {
        return DotSegment::Current(0);
    }
    if is_url_slash(bytes[after_dot]) {
        return DotSegment::Current(1);
    }
    let second = dot_len(bytes, after_dot);
    if second > 0 {
        let after_second = after_dot + second;
        if after_second == end {
            return DotSegment::Up(second);
        }
        if is_url_slash(bytes[after_second]) {
            return DotSegment::Up(second + 1);
        }
    }
    DotSegment::NotADirectory
}

/// Chromium `BackUpToPreviousSlash`: drop the last segment of `out` (which
/// ends in `/`).
///
/// Choice: `..` above the root is clamped at the first slash, so `/..` is `/`
/// and `/a/../../b` is `/b` (envoy `source/common/chromium_url/url_canon_path.cc`).
fn back_up_to_previous_slash(out: &mut Vec<u8>) {
    let Some(mut i) = out.len().checked_sub(1) else {
        return;
    };
    if i == 0 {
        return;
    }
    i -= 1;
    while out[i] != b'/' && i > 0 {
        i -= 1;
    }
    out.truncate(i + 1);
}

/// Chromium `CheckForNestedEscapes`.
///
/// Choice: an invalid `%` whose following characters become a valid escape
/// once an inner escape is decoded (`%%30%30` → `%00`) is rewritten as `%25`,
/// so the output can't decode differently on a second pass (`%%30%30` →
/// `%2500`). Reproduced including its blind spot: `last_invalid_percent` is
/// never reset, so after a `..` has truncated the output past it the repair
/// can touch unrelated bytes (see the `nested_escape_after_dot_dot` test).
/// Source: envoy `source/common/chromium_url/url_canon_path.cc`.
fn check_for_nested_escapes(
    input: &[u8],
    next_input: usize,
    last_invalid_percent: usize,
    out: &mut Vec<u8>,
) {
    let length = out.len();
    let Some(&last_unescaped) = out.last() else {
        return;
    };
    let append_next = last_invalid_percent + 2 == length;
    if append_next {
        match input.get(next_input) {
            Some(&next) if next < 0x80 => out.push(next),
            _ => return,
        }
    }
    if decode_escaped(out, last_invalid_percent).is_some() {
        if !append_next {
            out.push(out[last_invalid_percent + 1]);
        }
        out[last_invalid_percent + 1] = b'2';
        out[last_invalid_percent + 2] = b'5';
        out.push(last_unescaped);
    } else if append_next {
        out.truncate(length);
    }
}

fn push_escaped(b: u8, out: &mut Vec<u8>) {
    out.extend_from_slice(&[
        b'%',
        UPPER_HEX[usize::from(b >> 4)],
        UPPER_HEX[usize::from(b & 0xf)],
    ]);
}

/// Conservative pre-check: `false` guarantees [`canonicalize_bytes`] would
/// return its input unchanged. Keeps already-canonical paths (including ones
/// with `.` in file names and kept escapes like `%20`) allocation-free.
///
/// It relies on the output equalling the input up to the first change, so
/// "the previous output byte" is simply the previous input byte.
fn may_change(input: &[u8]) -> bool {
    match input.first() {
        Some(b'/') => {}
        _ => return true,
    }
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        match b {
            b'%' => {
                if let Some(value) = decode_escaped(input, i) {
                    if matches!(
                        class_of(value),
                        CharClass::Dot | CharClass::Unescape | CharClass::Invalid
                    ) {
                        return true;
                    }
                    i += 3;
                    continue;
                }
            }
            b'.' => {
                if input[i - 1] == b'/'
                    && classify_after_dot(input, i + 1) != DotSegment::NotADirectory
                {
                    return true;
                }
            }
            b'\\' => return true,
            _ => {
                if matches!(class_of(b), CharClass::Escape | CharClass::Invalid) {
                    return true;
                }
            }
        }
        i += 1;
    }
    false
}

/// Chromium `DoPath`/`DoPartialPath` over a path component.
fn canonicalize_bytes(input: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(input.len() + 8);
    if input.first().is_none_or(|&b| !is_url_slash(b)) {
        out.push(b'/');
    }
    let mut last_invalid_percent: Option<usize> = None;
    let mut i = 0;
    while i < input.len() {
        let dot = dot_len(input, i);
        if dot > 0 {
            if out.last() == Some(&b'/') {
                match classify_after_dot(input, i + dot) {
                    DotSegment::NotADirectory => {
                        out.push(b'.');
                        i += dot;
                    }
                    DotSegment::Current(consumed) => i += dot + consumed,
                    DotSegment::Up(consumed) => {
                        back_up_to_previous_slash(&mut out);
                        i += dot + consumed;
                    }
                }
            } else {
                out.push(b'.');
                i += dot;
            }
            continue;
        }

        let b = input[i];
        match b {
            b'\\' => out.push(b'/'),
            b'%' => match decode_escaped(input, i) {
                Some(value) => {
                    match class_of(value) {
                        CharClass::Unescape => {
                            out.push(value);
                            if let Some(percent) = last_invalid_percent {
                                if percent + 3 >= out.len() {
                                    check_for_nested_escapes(input, i + 3, percent, &mut out);
                                }
                            }
                        }
                        CharClass::Invalid => return Err(PathError::NulByte),
                        // Choice: escapes that stay escaped are copied with
                        // their original hex case (`%2f` stays `%2f`); only
                        // escapes Chromium creates are uppercase. Source:
                        // envoy `source/common/chromium_url/url_canon_path.cc`.
                        CharClass::Pass | CharClass::Escape | CharClass::Dot => {
                            out.extend_from_slice(&input[i..i + 3]);
                        }
                    }
                    i += 3;
                    continue;
                }
                // Choice: a `%` not followed by two hex digits is passed
                // through unchanged rather than rejected or escaped to `%25`
                // (Chromium's "permissive behavior", envoy
                // `source/common/chromium_url/url_canon_path.cc`).
                None => {
                    last_invalid_percent = Some(out.len());
                    out.push(b'%');
                }
            },
            _ => match class_of(b) {
                CharClass::Invalid => return Err(PathError::NulByte),
                CharClass::Escape => push_escaped(b, &mut out),
                CharClass::Pass | CharClass::Unescape | CharClass::Dot => out.push(b),
            },
        }
        i += 1;
    }
    Ok(out)
}

/// `normalize_path`: `None` when the path is already canonical.
fn canonicalize(path: &str) -> Result<Option<String>, PathError> {
    let input = path.as_bytes();
    if !may_change(input) {
        return Ok(None);
    }
    let out = canonicalize_bytes(input)?;
    if out == input {
        return Ok(None);
    }
    // Every byte the canonicalizer emits is ASCII (non-ASCII input is
    // percent-encoded), so this conversion cannot fail; the lossy fallback
    // only avoids a panic path.
    Ok(Some(String::from_utf8(out).unwrap_or_else(|e| {
        String::from_utf8_lossy(e.as_bytes()).into_owned()
    })))
}

// ---------------------------------------------------------------------------
// Path templates
// ---------------------------------------------------------------------------

const MATCH_ONE: &str = "{*}";
const MATCH_ANY: &str = "{**}";

/// Whether a `paths`/`notPaths` value is a template (contains `{*}` or
/// `{**}`) rather than an exact/prefix/suffix string.
pub fn is_template(v: &str) -> bool {
    v.contains(MATCH_ONE) || v.contains(MATCH_ANY)
}

/// Characters a template literal segment, a `{*}` capture and (with `/`) a
/// `{**}` capture may consist of.
///
/// Choice: RFC 3986 pchar minus `*`, i.e. `[a-zA-Z0-9-._~%!$&'()+,;:@=]`.
/// `=` is included as in current Envoy `kLiteral`
/// (`source/extensions/path/uri_template_lib/uri_template_internal.cc`) and
/// Istio's `validLiteral`. A path segment with any other byte (a literal `*`,
/// a raw space under normalization `NONE`, non-ASCII) never matches a glob.
fn is_literal_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b)
}

fn is_valid_literal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_literal_byte)
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{*}`: one non-empty segment.
    One,
}

impl Segment {
    fn matches(&self, segment: &str) -> bool {
        match self {
            Self::Literal(literal) => segment == literal,
            Self::One => is_valid_literal(segment),
        }
    }
}

/// A compiled Istio path template such as `/api/{*}/items/{**}`.
///
/// Choice: Istio rewrites `{*}` to `*` and `{**}` to `**` and hands the
/// result to Envoy's `uri_template` matcher (istio
/// `pilot/pkg/security/authz/matcher/template.go`). Envoy compiles that to
/// the regex `/` + segments joined by `/`, with `*` → `[pchar]+` and `**` →
/// `[pchar/]*`, full-matched against the path with query and fragment
/// removed (envoy `source/extensions/path/uri_template_lib/uri_template_internal.cc`,
/// `source/extensions/path/match/uri_template/uri_template_match.cc`).
///
/// Because `{**}` is the last glob and every other piece is either a fixed
/// string or confined to one segment, that regex can be decided without
/// backtracking: segments before `{**}` are matched one-to-one, and what
/// follows `{**}` is a fixed suffix. Matching is linear in the path length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    /// Segments before `{**}`, or all segments when there is none.
    head: Vec<Segment>,
    /// With `{**}`: the fixed text that must follow what it matches (`/lit`
    /// per literal segment after it; `/` for a trailing slash).
    tail_after_any: Option<String>,
}

impl PathTemplate {
    /// Compiles a template. Accepts what Envoy's `parseURLPatternSyntax`
    /// accepts for templates Istio can produce.
    ///
    /// Choice (envoy `uri_template_internal.cc` `parseURLPatternSyntax`): the
    /// template must start with `/` and be printable ASCII; empty segments
    /// are only allowed as a single trailing `/`; no glob may follow `{**}`.
    /// Segments mixing a glob with text (`{*}.txt`) are refused, as Istio's
    /// validation already refuses them.
    pub fn parse(template: &str) -> Result<Self, PathError> {
        let invalid = |reason: String| PathError::InvalidTemplate {
            template: template.to_owned(),
            reason,
        };
        let Some(rest) = template.strip_prefix('/') else {
            return Err(invalid("must start with '/'".to_owned()));
        };
        if !template.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "must consist of printable ASCII characters without spaces".to_owned(),
            ));
        }

        let mut head = Vec::new();
        let mut tail_after_any: Option<String> = None;
        if !rest.is_empty() {
            let parts: Vec<&str> = rest.split('/').collect();
            let last = parts.len() - 1;
            for (n, part) in parts.into_iter().enumerate() {
                if part == MATCH_ONE || part == MATCH_ANY {
                    if tail_after_any.is_some() {
                        return Err(invalid("{**} must be the last operator".to_owned()));
                    }
                    if part == MATCH_ONE {
                        head.push(Segment::One);
                    } else {
                        tail_after_any = Some(String::new());
                    }
                    continue;
                }
                if part.is_empty() {
                    if n != last {
                        return Err(invalid("empty path segment".to_owned()));
                    }
                } else if !is_valid_literal(part) {
                    return Err(invalid(format!(
                        "segment {part:?} is not a valid literal (allowed: a-zA-Z0-9-._~%!$&'()+,;:@=)"
                    )));
                }
                match &mut tail_after_any {
                    Some(tail) => {
                        tail.push('/');
                        tail.push_str(part);
                    }
                    None => head.push(Segment::Literal(part.to_owned())),
                }
            }
        }
        Ok(Self {
            head,
            tail_after_any,
        })
    }

    /// Whether `path` matches. Anything from the first `?` or `#` on is
    /// ignored, as Envoy's matcher does; matching is case-sensitive.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.find(['?', '#']).map_or(path, |end| &path[..end]);
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        match &self.tail_after_any {
            None => {
                if self.head.is_empty() {
                    return rest.is_empty();
                }
                let mut parts = rest.split('/');
                self.head
                    .iter()
                    .all(|segment| parts.next().is_some_and(|part| segment.matches(part)))
                    && parts.next().is_none()
            }
            Some(tail) => {
                for segment in &self.head {
                    let Some((part, after)) = rest.split_once('/') else {
                        return false;
                    };
                    if !segment.matches(part) {
                        return false;
                    }
                    rest = after;
                }
                rest.strip_suffix(tail.as_str())
                    .is_some_and(|globbed| globbed.bytes().all(|b| b == b'/' || is_literal_byte(b)))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Istio validation of paths / notPaths
// ---------------------------------------------------------------------------

/// Istio's admission check for one `paths`/`notPaths` value.
///
/// Choice: a transcription of istio `pkg/config/security/security.go`
/// `CheckValidPathTemplate`: trim every leading/trailing `/`, split on `/`;
/// `{*}` is fine, `{**}` is fine once and nothing glob-like may follow it;
/// any other segment with `{` or `}` is refused even in non-template values
/// (so `/api/{id}` is rejected); in template values every other segment must
/// be a valid literal (so `*`, empty segments and `{*}.txt` are refused).
/// There is deliberately no check for a leading `/`. Messages quote the
/// trimmed path, as Istio's do; the caller adds which field it came from.
pub fn validate_path_value(v: &str) -> Result<(), String> {
    let template = is_template(v);
    let trimmed = v.trim_matches('/');
    let mut seen_any = false;
    for segment in trimmed.split('/') {
        if segment == MATCH_ONE || segment == MATCH_ANY {
            if seen_any {
                return Err(format!(
                    "invalid or unsupported path {trimmed}. {{**}} is not the last operator"
                ));
            }
            seen_any = segment == MATCH_ANY;
            continue;
        }
        if segment.contains(['{', '}']) {
            return Err(format!(
                "invalid or unsupported path {trimmed}. \
                 Contains '{{' or '}}' beyond a supported path template"
            ));
        }
        if template && !is_valid_literal(segment) {
            return Err(format!(
                "invalid or unsupported path {trimmed}. \
                 Contains segment {segment} with invalid string literal"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODES: [Normalization; 4] = [
        Normalization::None,
        Normalization::Base,
        Normalization::MergeSlashes,
        Normalization::DecodeAndMergeSlashes,
    ];

    /// `[input, NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES]`;
    /// [`REJECT`] means the request is refused with [`PathError::NulByte`].
    const NORMALIZE_TABLE: &[[&str; 5]] = &[
        ["/a/../b", "/a/../b", "/b", "/b", "/b"],
        ["/a/./b", "/a/./b", "/a/b", "/a/b", "/a/b"],
        ["/..", "/..", "/", "/", "/"],
        ["/.", "/.", "/", "/", "/"],
        ["/a/..", "/a/..", "/", "/", "/"],
        ["/a/.", "/a/.", "/a/", "/a/", "/a/"],
        ["/a/../../b", "/a/../../b", "/b", "/b", "/b"],
        ["/a/%2e%2e/b", "/a/%2e%2e/b", "/b", "/b", "/b"],
        ["/a/%2E./b", "/a/%2E./b", "/b", "/b", "/b"],
        ["/a/.%2e", "/a/.%2e", "/", "/", "/"],
        ["/a%2eb", "/a%2eb", "/a.b", "/a.b", "/a.b"],
        ["/a/..\\b", "/a/..\\b", "/b", "/b", "/b"],
        ["/...", "/...", "/...", "/...", "/..."],
        ["/a/..b", "/a/..b", "/a/..b", "/a/..b", "/a/..b"],
        ["/a%2Fb", "/a%2Fb", "/a%2Fb", "/a%2Fb", "/a/b"],
        ["/a%2fb", "/a%2fb", "/a%2fb", "/a%2fb", "/a/b"],
        ["/a%5Cb", "/a%5Cb", "/a%5Cb", "/a%5Cb", "/a/b"],
        ["/a%5cb", "/a%5cb", "/a%5cb", "/a%5cb", "/a/b"],
        ["/a\\b", "/a\\b", "/a/b", "/a/b", "/a/b"],
        ["//admin", "//admin", "//admin", "/admin", "/admin"],
        ["/a//b/", "/a//b/", "/a//b/", "/a/b/", "/a/b/"],
        ["/%2Fadmin", "/%2Fadmin", "/%2Fadmin", "/%2Fadmin", "/admin"],
        ["/%5C%2e%2e/x", "/%5C%2e%2e/x", "/%5C../x", "/%5C../x", "/x"],
        [
            "/a%2F..%2Fb",
            "/a%2F..%2Fb",
            "/a%2F..%2Fb",
            "/a%2F..%2Fb",
            "/b",
        ],
        // Single pass: `%25` is never decoded, so no double decoding either.
        ["/a%252Fb", "/a%252Fb", "/a%252Fb", "/a%252Fb", "/a%252Fb"],
        ["/a%2%2Fb", "/a%2%2Fb", "/a%2%2Fb", "/a%2%2Fb", "/a%2/b"],
        ["/%41dmin", "/%41dmin", "/Admin", "/Admin", "/Admin"],
        ["/%7e%2D%5f%30", "/%7e%2D%5f%30", "/~-_0", "/~-_0", "/~-_0"],
        ["/admin%00", "/admin%00", REJECT, REJECT, REJECT],
        ["/a b", "/a b", "/a%20b", "/a%20b", "/a%20b"],
        ["/a;b", "/a;b", "/a;b", "/a;b", "/a;b"],
        [
            "/a\"<>^`{|}",
            "/a\"<>^`{|}",
            "/a%22%3C%3E%5E%60%7B%7C%7D",
            "/a%22%3C%3E%5E%60%7B%7C%7D",
            "/a%22%3C%3E%5E%60%7B%7C%7D",
        ],
        ["/a?b#c", "/a?b#c", "/a%3Fb%23c", "/a%3Fb%23c", "/a%3Fb%23c"],
        [
            "/[]:@!$&'()*+,;=",
            "/[]:@!$&'()*+,;=",
            "/[]:@!$&'()*+,;=",
            "/[]:@!$&'()*+,;=",
            "/[]:@!$&'()*+,;=",
        ],
        [
            "/caf\u{e9}",
            "/caf\u{e9}",
            "/caf%C3%A9",
            "/caf%C3%A9",
            "/caf%C3%A9",
        ],
        ["/a\u{7f}", "/a\u{7f}", "/a%7F", "/a%7F", "/a%7F"],
        // Escapes that stay escaped keep their case.
        [
            "/a%3fb%20c",
            "/a%3fb%20c",
            "/a%3fb%20c",
            "/a%3fb%20c",
            "/a%3fb%20c",
        ],
        ["/a%zz%2", "/a%zz%2", "/a%zz%2", "/a%zz%2", "/a%zz%2"],
        ["/%%30%30", "/%%30%30", "/%2500", "/%2500", "/%2500"],
        ["/%%300", "/%%300", "/%2500", "/%2500", "/%2500"],
        ["/%%30%", "/%%30%", "/%0%", "/%0%", "/%0%"],
        // Envoy's merge keeps a leading and a trailing slash around zero segments.
        ["//", "//", "//", "//", "//"],
        ["///", "///", "///", "//", "//"],
        ["/", "/", "/", "/", "/"],
        ["///a/../b", "///a/../b", "///b", "/b", "/b"],
        ["/x/%2F/y", "/x/%2F/y", "/x/%2F/y", "/x/%2F/y", "/x/y"],
    ];

    const REJECT: &str = "<rejected>";

    #[test]
    fn normalize_table() {
        for [input, expected @ ..] in NORMALIZE_TABLE {
            for (mode, want) in MODES.iter().zip(expected) {
                let got = normalize(input, *mode);
                if *want == REJECT {
                    assert_eq!(got, Err(PathError::NulByte), "{input:?} under {mode:?}");
                } else {
                    assert_eq!(got.as_deref(), Ok(*want), "{input:?} under {mode:?}");
                }
            }
        }
    }

    #[test]
    fn already_normal_paths_are_borrowed() {
        for path in [
            "/",
            "/api/v1/users",
            "/static/index.html",
            "/.well-known/openid-configuration",
            "/a/..b/c.",
            "/a%20b/%3f/%25/%22",
            "/a%zz",
            "/a;b=c:d@e",
        ] {
            for mode in MODES {
                let got = normalize(path, mode).unwrap();
                assert!(
                    matches!(got, Cow::Borrowed(p) if p == path),
                    "{path:?} under {mode:?} gave {got:?}"
                );
            }
        }
    }

    #[test]
    fn changed_paths_are_owned() {
        assert!(matches!(
            normalize("/a/../b", Normalization::Base).unwrap(),
            Cow::Owned(_)
        ));
        // Merging alone can leave the text identical; it is still borrowed.
        assert!(matches!(
            normalize("//", Normalization::MergeSlashes).unwrap(),
            Cow::Borrowed("//")
        ));
    }

    #[test]
    fn non_absolute_and_nul_paths_are_refused_in_every_mode() {
        for mode in MODES {
            assert_eq!(normalize("", mode), Err(PathError::Empty));
            assert_eq!(normalize("a/b", mode), Err(PathError::NotAbsolute));
            assert_eq!(normalize("\\a", mode), Err(PathError::NotAbsolute));
            assert_eq!(normalize("*", mode), Err(PathError::NotAbsolute));
            assert_eq!(normalize("http://h/a", mode), Err(PathError::NotAbsolute));
            assert_eq!(normalize("/a\0b", mode), Err(PathError::NulByte));
        }
        // A `%00` only matters when the canonicalizer runs.
        assert!(normalize("/%00", Normalization::None).is_ok());
        assert_eq!(
            normalize("/%2F%00", Normalization::DecodeAndMergeSlashes),
            Err(PathError::NulByte)
        );
    }

    #[test]
    fn error_statuses_and_messages() {
        assert_eq!(PathError::Empty.http_status(), 404);
        assert_eq!(PathError::NotAbsolute.http_status(), 404);
        assert_eq!(PathError::NulByte.http_status(), 400);
        assert_eq!(
            PathError::NotAbsolute.to_string(),
            "request path must start with '/'"
        );
        let err = PathTemplate::parse("/a/{**}/{*}").unwrap_err();
        assert_eq!(err.http_status(), 400);
        assert_eq!(
            err.to_string(),
            "invalid path template \"/a/{**}/{*}\": {**} must be the last operator"
        );
    }

    #[test]
    fn nested_escape_after_dot_dot() {
        // Chromium never forgets an earlier invalid `%`; once `..` has cut
        // the output below it, the nested-escape repair rewrites `Ab` as
        // `25Ab`. Envoy forwards exactly that, so policies must see it too.
        assert_eq!(
            normalize("/ab%/../xyz%41b", Normalization::Base).as_deref(),
            Ok("/xyz25Ab")
        );
        // Without the `..` the same bytes are left as they are.
        assert_eq!(
            normalize("/ab%/xyz%41b", Normalization::Base).as_deref(),
            Ok("/ab%/xyzAb")
        );
    }

    #[test]
    fn may_change_is_conservative() {
        // Exhaustive over short paths: whenever the pre-check says "no
        // change", the full canonicalizer must agree.
        const ALPHABET: &[u8] = b"/.%2eEaF0\\4 1";
        let mut buf = Vec::new();
        let mut checked = 0;
        for len in 0..=4u32 {
            for mut n in 0..ALPHABET.len().pow(len) {
                buf.clear();
                buf.push(b'/');
                for _ in 0..len {
                    buf.push(ALPHABET[n % ALPHABET.len()]);
                    n /= ALPHABET.len();
                }
                if !may_change(&buf) {
                    assert_eq!(
                        canonicalize_bytes(&buf).as_deref(),
                        Ok(buf.as_slice()),
                        "{:?}",
                        String::from_utf8_lossy(&buf)
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 1000);
    }

    #[test]
    fn normalization_parse_and_flags() {
        assert_eq!(Normalization::parse("NONE"), Some(Normalization::None));
        assert_eq!(Normalization::parse("BASE"), Some(Normalization::Base));
        assert_eq!(Normalization::parse("DEFAULT"), Some(Normalization::Base));
        assert_eq!(
            Normalization::parse("MERGE_SLASHES"),
            Some(Normalization::MergeSlashes)
        );
        assert_eq!(
            Normalization::parse("DECODE_AND_MERGE_SLASHES"),
            Some(Normalization::DecodeAndMergeSlashes)
        );
        assert_eq!(Normalization::parse("base"), None);
        assert_eq!(Normalization::parse(""), None);
        assert_eq!(Normalization::default(), Normalization::Base);
        assert!(!Normalization::None.canonicalizes());
        assert!(!Normalization::Base.merges_slashes());
        assert!(Normalization::MergeSlashes.merges_slashes());
        assert!(!Normalization::MergeSlashes.decodes_escaped_slashes());
        assert!(Normalization::DecodeAndMergeSlashes.decodes_escaped_slashes());
    }

    #[test]
    fn split_request_target_cases() {
        let cases: &[(&str, (&str, Option<&str>))] = &[
            ("/x?y#z", ("/x", Some("y"))),
            ("/x#a?b", ("/x", None)),
            ("/x", ("/x", None)),
            ("/x?", ("/x", Some(""))),
            ("/x?a?b", ("/x", Some("a?b"))),
            ("/x?a=1&b=2#", ("/x", Some("a=1&b=2"))),
            ("#frag", ("", None)),
            ("", ("", None)),
        ];
        for (raw, want) in cases {
            assert_eq!(split_request_target(raw), *want, "{raw:?}");
        }
    }

    fn tmpl(t: &str) -> PathTemplate {
        PathTemplate::parse(t).unwrap_or_else(|e| panic!("{t}: {e}"))
    }

    #[test]
    fn template_doc_examples() {
        let one = tmpl("/foo/{*}");
        assert!(one.matches("/foo/bar"));
        assert!(!one.matches("/foo/bar/baz"));

        let any_slash = tmpl("/foo/{**}/");
        assert!(any_slash.matches("/foo/bar/"));
        assert!(any_slash.matches("/foo//"));
        assert!(!any_slash.matches("/foo/bar"));
        // Istio's reference docs list `/foo/bar/baz.txt` as a match, but the
        // Envoy regex this compiles to (`/foo/[pchar/]*/`) requires a
        // trailing slash, and Envoy is what enforces the policy.
        assert!(!any_slash.matches("/foo/bar/baz.txt"));
        assert!(any_slash.matches("/foo/bar/baz/"));

        let mixed = tmpl("/foo/{*}/bar/{**}");
        assert!(mixed.matches("/foo/buzz/bar/"));
        assert!(mixed.matches("/foo/buzz/bar/baz"));
        assert!(mixed.matches("/foo/buzz/bar/baz/qux.txt"));
        assert!(!mixed.matches("/foo/buzz/bar"));
        assert!(!mixed.matches("/foo//bar/baz"));
        assert!(!mixed.matches("/foo/a/b/bar/baz"));
    }

    #[test]
    fn template_edge_cases() {
        let one = tmpl("/foo/{*}");
        assert!(!one.matches("/foo/"));
        assert!(!one.matches("/foo"));
        assert!(!one.matches("/Foo/bar"));
        assert!(one.matches("/foo/a=b"));
        assert!(one.matches("/foo/a%2Fb"));
        assert!(!one.matches("/foo/a*b"));
        assert!(!one.matches("/foo/a b"));
        assert!(!one.matches("/foo/caf\u{e9}"));
        assert!(one.matches("/foo/bar?x=/y"));
        assert!(one.matches("/foo/bar#/frag"));
        assert!(!one.matches("foo/bar"));

        let all = tmpl("/{**}");
        assert!(all.matches("/"));
        assert!(all.matches("/a/b/c"));
        assert!(all.matches("//"));
        assert!(!all.matches(""));
        assert!(!all.matches("/a/[b]"));

        let inner = tmpl("/api/{**}/edit");
        assert!(!inner.matches("/api/edit"));
        assert!(inner.matches("/api//edit"));
        assert!(inner.matches("/api/x/y/edit"));
        assert!(!inner.matches("/api/x/y/edit/"));

        let two = tmpl("/{*}/{*}");
        assert!(two.matches("/a/b"));
        assert!(!two.matches("/a"));
        assert!(!two.matches("/a/b/"));
        assert!(!two.matches("//b"));

        let exact = tmpl("/a/b/");
        assert!(exact.matches("/a/b/"));
        assert!(!exact.matches("/a/b"));
        let root = tmpl("/");
        assert!(root.matches("/"));
        assert!(!root.matches("/a"));
    }

    #[test]
    fn template_parse_errors() {
        for bad in [
            "foo/{*}",
            "",
            "/foo/{**}/{*}",
            "/{**}/{**}",
            "/foo/{id}",
            "/foo//{*}",
            "//{*}",
            "/foo/{*}.txt",
            "/foo/*/{*}",
            "/foo bar/{*}",
            "/foo/{*}\u{e9}",
        ] {
            assert!(
                matches!(
                    PathTemplate::parse(bad),
                    Err(PathError::InvalidTemplate { .. })
                ),
                "{bad:?} should be refused"
            );
        }
        assert!(PathTemplate::parse("/foo/{**}/bar/baz/").is_ok());
    }

    /// The Envoy regex for a template, as atoms, matched by brute-force
    /// backtracking: an independent oracle for the linear matcher.
    #[derive(Debug)]
    enum Atom {
        Text(String),
        OneOrMore,
        AnyWithSlash,
    }

    fn oracle_atoms(template: &str) -> Vec<Atom> {
        let mut atoms = vec![Atom::Text("/".into())];
        for (n, part) in template[1..].split('/').enumerate() {
            if n > 0 {
                atoms.push(Atom::Text("/".into()));
            }
            atoms.push(match part {
                "{*}" => Atom::OneOrMore,
                "{**}" => Atom::AnyWithSlash,
                lit => Atom::Text(lit.into()),
            });
        }
        atoms
    }

    fn oracle_match(atoms: &[Atom], s: &[u8]) -> bool {
        let Some((first, rest)) = atoms.split_first() else {
            return s.is_empty();
        };
        match first {
            Atom::Text(t) => s
                .strip_prefix(t.as_bytes())
                .is_some_and(|s| oracle_match(rest, s)),
            Atom::OneOrMore => (1..=s.len())
                .take_while(|&k| is_literal_byte(s[k - 1]))
                .any(|k| oracle_match(rest, &s[k..])),
            Atom::AnyWithSlash => (0..=s.len())
                .take_while(|&k| k == 0 || s[k - 1] == b'/' || is_literal_byte(s[k - 1]))
                .any(|k| oracle_match(rest, &s[k..])),
        }
    }

    #[test]
    fn template_matcher_agrees_with_regex_oracle() {
        const ALPHABET: &[u8] = b"/ab*";
        let templates = [
            "/a/{*}",
            "/{**}",
            "/a/{**}/",
            "/{*}/b/{**}",
            "/{**}/a/b",
            "/{*}/{*}/",
            "/a/",
            "/{*}",
        ];
        let compiled: Vec<_> = templates
            .iter()
            .map(|t| (tmpl(t), oracle_atoms(t)))
            .collect();
        let mut buf = Vec::new();
        for len in 0..=6u32 {
            for mut n in 0..ALPHABET.len().pow(len) {
                buf.clear();
                buf.push(b'/');
                for _ in 0..len {
                    buf.push(ALPHABET[n % ALPHABET.len()]);
                    n /= ALPHABET.len();
                }
                let path = std::str::from_utf8(&buf).unwrap();
                for ((template, atoms), raw) in compiled.iter().zip(templates) {
                    assert_eq!(
                        template.matches(path),
                        oracle_match(atoms, &buf),
                        "{raw} vs {path}"
                    );
                }
            }
        }
    }

    #[test]
    fn template_matching_is_linear() {
        let template = tmpl("/{*}/{*}/{**}/x/y/z");
        let long = format!("/a/b/{}", "c/".repeat(200_000));
        assert!(!template.matches(&long));
        assert!(template.matches(&format!("{long}x/y/z")));
    }

    #[test]
    fn is_template_detection() {
        assert!(is_template("/foo/{*}"));
        assert!(is_template("/foo/{**}"));
        assert!(is_template("{*}"));
        assert!(!is_template("/foo/*"));
        assert!(!is_template("/foo/{id}"));
        assert!(!is_template("/foo/{ * }"));
    }

    #[test]
    fn validate_accepts() {
        for ok in [
            "/foo/{*}",
            "/foo/{**}",
            "/foo/{*}/bar/{**}",
            "/foo/{**}/bar",
            "/foo/{**}/",
            "foo/{*}",
            "/{*}/{*}",
            "/api/v1/*",
            "*",
            "/a//b",
            "/a b",
            "/",
            "",
            "/foo/a=b/{*}",
        ] {
            assert_eq!(validate_path_value(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn validate_rejects() {
        let cases = [
            (
                "/api/{id}",
                "invalid or unsupported path api/{id}. \
                 Contains '{' or '}' beyond a supported path template",
            ),
            (
                "/foo/{**}/{*}",
                "invalid or unsupported path foo/{**}/{*}. {**} is not the last operator",
            ),
            (
                "/foo/{**}/bar/{**}/",
                "invalid or unsupported path foo/{**}/bar/{**}. {**} is not the last operator",
            ),
            (
                "/foo/{*}/*",
                "invalid or unsupported path foo/{*}/*. \
                 Contains segment * with invalid string literal",
            ),
            (
                "/foo//{*}",
                "invalid or unsupported path foo//{*}. \
                 Contains segment  with invalid string literal",
            ),
            (
                "/foo/{*}.txt",
                "invalid or unsupported path foo/{*}.txt. \
                 Contains '{' or '}' beyond a supported path template",
            ),
            (
                "/foo/}",
                "invalid or unsupported path foo/}. \
                 Contains '{' or '}' beyond a supported path template",
            ),
            (
                "/a b/{*}",
                "invalid or unsupported path a b/{*}. \
                 Contains segment a b with invalid string literal",
            ),
        ];
        for (value, message) in cases {
            assert_eq!(
                validate_path_value(value),
                Err(message.to_owned()),
                "{value:?}"
            );
        }
    }
}
