//! OCI distribution-spec types and the parsing of everything a client sends us.
//!
//! Every byte here comes from the network, so each parser returns a typed error that maps to an
//! OCI error code and a 4xx status; nothing in this module panics on input. The parsers are pure
//! functions so that they can be unit-tested and fuzzed (`fuzz/`) without a runtime.

use std::fmt;

use serde::Deserialize;

/// A content digest, `algorithm:hex`. Only sha256 is served: containerd's content store names
/// its blobs by sha256, and anything else cannot be found locally or verified cheaply.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let (alg, hex) = s.split_once(':').ok_or(OciError::DigestInvalid("missing algorithm"))?;
        match alg {
            "sha256" => {}
            "sha384" | "sha512" => return Err(OciError::DigestInvalid("only sha256 digests are served")),
            _ => return Err(OciError::DigestInvalid("unknown digest algorithm")),
        }
        if hex.len() != 64 {
            return Err(OciError::DigestInvalid("sha256 digest must have 64 hex characters"));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(OciError::DigestInvalid("digest must be lowercase hex"));
        }
        Ok(Self { hex: hex.to_owned() })
    }

    /// Digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self::from_sha256(sha2::Sha256::digest(bytes).into())
    }

    pub fn from_sha256(raw: [u8; 32]) -> Self {
        Self { hex: hex::encode(raw) }
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

/// A routed pull request, already validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`
    ApiVersion,
    Manifest {
        name: String,
        reference: Reference,
        registry: Option<String>,
    },
    Blob {
        name: String,
        digest: Digest,
        registry: Option<String>,
    },
    /// `/blobs/<upstream-url>`: Peerd's streaming path; the digest is taken from the URL's path.
    StreamBlob {
        digest: Digest,
        url: String,
    },
}

/// Errors of client input, each with its OCI code and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OciError {
    /// The repository name is outside the OCI grammar (or tries to escape with `..`).
    #[error("invalid repository name: {0}")]
    NameInvalid(&'static str),
    /// The digest is malformed or uses an algorithm we do not serve.
    #[error("invalid digest: {0}")]
    DigestInvalid(&'static str),
    /// The tag is outside the OCI grammar.
    #[error("invalid tag")]
    TagInvalid,
    /// The path is not part of the pull API.
    #[error("not found")]
    NotFound,
    /// No node has the blob (and upstream did not give it to us): containerd goes to its next host.
    #[error("blob unknown to this mirror")]
    BlobUnknown,
    /// No node has the manifest or tag: containerd goes to its next host.
    #[error("manifest unknown to this mirror")]
    ManifestUnknown,
    /// A write method: this mirror is pull-only.
    #[error("this registry mirror is pull-only")]
    Unsupported,
    /// The `ns` parameter names a registry that is not mirrored.
    #[error("registry {0} is not mirrored by this node")]
    RegistryDenied(String),
    /// A URL peerd will not fetch on a client's behalf (see `crate::egress`).
    #[error("upstream URL refused: {0}")]
    UpstreamDenied(&'static str),
    /// The request could not be parsed as HTTP/1.1.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request line or header block is over the size limit.
    #[error("request header fields too large")]
    HeadersTooLarge,
    /// The Range header cannot be satisfied for this blob.
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable { size: u64 },
}

impl OciError {
    pub fn status(&self) -> u16 {
        match self {
            OciError::NameInvalid(_) | OciError::DigestInvalid(_) | OciError::TagInvalid => 400,
            OciError::BadRequest(_) => 400,
            OciError::NotFound | OciError::BlobUnknown | OciError::ManifestUnknown => 404,
            OciError::Unsupported => 405,
            OciError::RegistryDenied(_) | OciError::UpstreamDenied(_) => 403,
            OciError::HeadersTooLarge => 431,
            OciError::RangeNotSatisfiable { .. } => 416,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            OciError::NameInvalid(_) => "NAME_INVALID",
            OciError::DigestInvalid(_) => "DIGEST_INVALID",
            OciError::TagInvalid => "MANIFEST_INVALID",
            OciError::NotFound => "NOT_FOUND",
            OciError::BlobUnknown => "BLOB_UNKNOWN",
            OciError::ManifestUnknown => "MANIFEST_UNKNOWN",
            OciError::Unsupported => "UNSUPPORTED",
            OciError::RegistryDenied(_) | OciError::UpstreamDenied(_) => "DENIED",
            OciError::BadRequest(_) | OciError::HeadersTooLarge => "UNSUPPORTED",
            OciError::RangeNotSatisfiable { .. } => "BLOB_UNKNOWN",
        }
    }
}

/// The OCI error body: `{"errors":[{"code":..,"message":..}]}`.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] }).to_string()
}

/// Validates a repository name against the distribution-spec grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn validate_name(name: &str) -> Result<(), OciError> {
    if name.is_empty() {
        return Err(OciError::NameInvalid("empty name"));
    }
    if name.len() > 255 {
        return Err(OciError::NameInvalid("name longer than 255 characters"));
    }
    for component in name.split('/') {
        validate_component(component)?;
    }
    Ok(())
}

fn validate_component(c: &str) -> Result<(), OciError> {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() {
        return Err(OciError::NameInvalid("empty path component"));
    }
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err(OciError::NameInvalid("components must start and end with [a-z0-9]"));
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-+"; it must be followed by [a-z0-9].
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return Err(OciError::NameInvalid("character outside [a-z0-9._-/]")),
        }
        if i >= b.len() || !alnum(b[i]) || i == start {
            return Err(OciError::NameInvalid("separators must sit between [a-z0-9]"));
        }
    }
    Ok(())
}

/// Validates a tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), OciError> {
    let b = tag.as_bytes();
    if b.is_empty() || b.len() > 128 {
        return Err(OciError::TagInvalid);
    }
    let first_ok = b[0].is_ascii_alphanumeric() || b[0] == b'_';
    if !first_ok || !b.iter().all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-')) {
        return Err(OciError::TagInvalid);
    }
    Ok(())
}

/// Routes a request target (`path?query`) of a pull method. The path must be exactly what the
/// client sent: percent-encoding is not decoded for `/v2` paths, so `%2e%2e` is simply a
/// character outside the grammar and refused.
pub fn route(method: &str, target: &str) -> Result<Route, OciError> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let is_pull = matches!(method, "GET" | "HEAD");
    if let Some(rest) = path.strip_prefix("/blobs/") {
        if !is_pull {
            return Err(OciError::Unsupported);
        }
        return route_stream_blob(rest, query);
    }
    let Some(rest) = path.strip_prefix("/v2") else {
        return Err(OciError::NotFound);
    };
    if !is_pull {
        // Anything under /v2 with a write method is a push attempt.
        return Err(OciError::Unsupported);
    }
    if rest.is_empty() || rest == "/" {
        return Ok(Route::ApiVersion);
    }
    let rest = rest.strip_prefix('/').ok_or(OciError::NotFound)?;
    // containerd escapes the query (`ns=host%3A5000`); the path is compared raw on purpose.
    let registry = match query.and_then(|q| query_param(q, "ns")) {
        Some(v) => Some(
            percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map_err(|_| OciError::BadRequest("ns is not UTF-8"))?
                .into_owned(),
        ),
        None => None,
    };
    if let Some(reg) = &registry {
        validate_registry_host(reg)?;
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        validate_name(name)?;
        let reference = if reference.contains(':') {
            Reference::Digest(Digest::parse(reference)?)
        } else {
            validate_tag(reference)?;
            Reference::Tag(reference.to_owned())
        };
        return Ok(Route::Manifest { name: name.to_owned(), reference, registry });
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        validate_name(name)?;
        if digest.starts_with("uploads") {
            return Err(OciError::Unsupported);
        }
        let digest = Digest::parse(digest)?;
        return Ok(Route::Blob { name: name.to_owned(), digest, registry });
    }
    if rest.ends_with("/tags/list") || rest == "_catalog" {
        return Err(OciError::Unsupported);
    }
    Err(OciError::NotFound)
}

fn route_stream_blob(rest: &str, query: Option<&str>) -> Result<Route, OciError> {
    let url = match query {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(OciError::BadRequest("/blobs/ takes an absolute http(s) URL"));
    }
    // The digest is the path segment after `sha256:` (registries) or a 64-hex segment (blob stores).
    let path = rest.split_once("://").map(|(_, p)| p).unwrap_or(rest);
    for seg in path.split('/') {
        let seg = seg.replace("%3A", ":").replace("%3a", ":");
        if let Some(hex) = seg.strip_prefix("sha256:") {
            return Ok(Route::StreamBlob { digest: Digest::parse(&format!("sha256:{hex}"))?, url });
        }
    }
    Err(OciError::DigestInvalid("the URL's path carries no sha256 digest"))
}

/// A registry host as containerd writes it in `ns=`: `host[:port]`, no scheme, no path.
fn validate_registry_host(h: &str) -> Result<(), OciError> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if ok {
        Ok(())
    } else {
        Err(OciError::BadRequest("ns must be a registry host[:port]"))
    }
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

/// A satisfiable byte range, inclusive of both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    /// Bytes in the range; never zero, since both ends are inclusive.
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Parses a `Range` header against a blob of `size` bytes.
///
/// `Ok(None)` means "serve the whole blob": no header, a unit other than bytes, or a header we
/// ignore as RFC 9110 allows. Multiple ranges are answered with the whole blob (200): it is
/// always correct, containerd never asks for them, and it avoids multipart bodies.
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<ByteRange>, OciError> {
    let Some(h) = header else { return Ok(None) };
    let Some(spec) = h.trim().strip_prefix("bytes=") else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(OciError::BadRequest("malformed Range"))?;
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Result<u64, OciError> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(OciError::BadRequest("malformed Range"));
        }
        s.parse::<u64>().map_err(|_| OciError::BadRequest("malformed Range"))
    };
    let unsat = OciError::RangeNotSatisfiable { size };
    let range = if a.is_empty() {
        // Suffix range: the last n bytes.
        let n = num(b)?;
        if n == 0 || size == 0 {
            return Err(unsat);
        }
        ByteRange { start: size.saturating_sub(n), end: size - 1 }
    } else {
        let start = num(a)?;
        if start >= size {
            return Err(unsat);
        }
        let end = if b.is_empty() { size - 1 } else { num(b)?.min(size - 1) };
        if end < start {
            return Err(unsat);
        }
        ByteRange { start, end }
    };
    Ok(Some(range))
}

pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// A descriptor, as found in manifests and indexes.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
}

/// The fields of a manifest or index that peerd needs; both kinds parse into this one shape.
#[derive(Debug, Default, Deserialize)]
pub struct ManifestDoc {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl ManifestDoc {
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// The real media type, also for documents that omit the optional `mediaType` field: an
    /// index has `manifests`; a manifest has `config` and `layers`, and is Docker's schema 2 when
    /// its config says so.
    pub fn detect_media_type(&self) -> Option<&str> {
        if let Some(mt) = self.media_type.as_deref().filter(|m| !m.is_empty()) {
            return Some(mt);
        }
        if !self.manifests.is_empty() {
            return Some(MEDIA_OCI_INDEX);
        }
        let config = self.config.as_ref()?;
        if config.media_type == MEDIA_DOCKER_CONFIG {
            Some(MEDIA_DOCKER_MANIFEST)
        } else {
            Some(MEDIA_OCI_MANIFEST)
        }
    }

    /// Every digest this document points to.
    pub fn children(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(self.layers.iter()).chain(self.manifests.iter())
    }
}

/// The key under which a tag is announced in the DHT: `registry/name:tag`, which is also the
/// image name containerd stores.
pub fn tag_key(registry: &str, name: &str, tag: &str) -> String {
    format!("{registry}/{name}:{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn digests() {
        assert!(Digest::parse(D).is_ok());
        assert_eq!(Digest::parse(D).map(|d| d.to_string()).as_deref(), Ok(D));
        for bad in [
            "sha256:0123",
            "sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256:g123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "md5:0123456789abcdef0123456789abcdef",
            "sha512:00",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "",
        ] {
            assert!(matches!(Digest::parse(bad), Err(OciError::DigestInvalid(_))), "{bad}");
        }
    }

    #[test]
    fn names() {
        for ok in ["library/nginx", "a", "a/b/c", "my-app", "my__app", "my.app", "a--b", "bench/img1"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", "a/../b", "A", "a//b", "/a", "a/", "-a", "a-", "a___b", "a.-b", "%2e%2e", "a b", "a\0"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name(&"a".repeat(256)).is_err());
    }

    #[test]
    fn routes() {
        let r = route("GET", &format!("/v2/library/nginx/blobs/{D}?ns=docker.io")).unwrap();
        assert!(
            matches!(r, Route::Blob { ref name, ref registry, .. } if name == "library/nginx" && registry.as_deref() == Some("docker.io"))
        );
        let r = route("HEAD", "/v2/a/b/manifests/v1.0?ns=198.18.0.2:5000").unwrap();
        assert!(matches!(r, Route::Manifest { reference: Reference::Tag(ref t), .. } if t == "v1.0"));
        let r = route("HEAD", "/v2/a/b/manifests/v1.0?ns=198.18.0.2%3A5000").unwrap();
        assert!(matches!(r, Route::Manifest { registry: Some(ref r), .. } if r == "198.18.0.2:5000"));
        assert_eq!(route("GET", "/v2/").unwrap(), Route::ApiVersion);
        assert_eq!(route("GET", "/v2").unwrap(), Route::ApiVersion);
        assert_eq!(route("PUT", "/v2/a/manifests/v1"), Err(OciError::Unsupported));
        assert_eq!(route("POST", "/v2/a/blobs/uploads/"), Err(OciError::Unsupported));
        assert_eq!(route("GET", "/v2/a/blobs/uploads/x"), Err(OciError::Unsupported));
        assert!(route("GET", &format!("/v2/../etc/blobs/{D}")).is_err());
        assert!(route("GET", &format!("/v2/%2e%2e/blobs/{D}")).is_err());
        assert!(route("GET", "/v2/a/manifests/-bad").is_err());
        assert!(route("GET", "/v2/a/manifests/sha256:00").is_err());
        assert!(route("GET", "/v2/a/manifests/v1?ns=evil/path").is_err());
        assert_eq!(route("GET", "/etc/passwd"), Err(OciError::NotFound));
        let r = route("GET", &format!("/blobs/https://r.example/v2/x/blobs/{D}?se=1")).unwrap();
        assert!(matches!(r, Route::StreamBlob { .. }));
        assert!(route("GET", "/blobs/https://r.example/nothing").is_err());
    }

    #[test]
    fn ranges() {
        let r = |h: &str| parse_range(Some(h), 100);
        assert_eq!(r("bytes=0-9"), Ok(Some(ByteRange { start: 0, end: 9 })));
        assert_eq!(r("bytes=90-"), Ok(Some(ByteRange { start: 90, end: 99 })));
        assert_eq!(r("bytes=-10"), Ok(Some(ByteRange { start: 90, end: 99 })));
        assert_eq!(r("bytes=-1000"), Ok(Some(ByteRange { start: 0, end: 99 })));
        assert_eq!(r("bytes=50-1000"), Ok(Some(ByteRange { start: 50, end: 99 })));
        assert_eq!(r("bytes=0-1,5-6"), Ok(None));
        assert_eq!(r("items=0-1"), Ok(None));
        assert_eq!(parse_range(None, 100), Ok(None));
        assert!(matches!(r("bytes=9-0"), Err(OciError::RangeNotSatisfiable { .. })));
        assert!(matches!(r("bytes=100-"), Err(OciError::RangeNotSatisfiable { .. })));
        assert!(matches!(r("bytes=-0"), Err(OciError::RangeNotSatisfiable { .. })));
        assert!(matches!(r("bytes=a-b"), Err(OciError::BadRequest(_))));
        assert!(matches!(r("bytes=99999999999999999999999-"), Err(OciError::BadRequest(_))));
        assert!(matches!(r("bytes=-"), Err(OciError::BadRequest(_))));
    }

    #[test]
    fn media_types_without_the_field() {
        let m = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aa","size":1},"layers":[]}"#;
        assert_eq!(ManifestDoc::parse(m).unwrap().detect_media_type(), Some(MEDIA_OCI_MANIFEST));
        let d = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:aa","size":1},"layers":[]}"#;
        assert_eq!(ManifestDoc::parse(d).unwrap().detect_media_type(), Some(MEDIA_DOCKER_MANIFEST));
        let i = br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:aa","size":1}]}"#;
        assert_eq!(ManifestDoc::parse(i).unwrap().detect_media_type(), Some(MEDIA_OCI_INDEX));
        let l = br#"{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
        assert_eq!(
            ManifestDoc::parse(l).unwrap().detect_media_type(),
            Some("application/vnd.docker.distribution.manifest.list.v2+json")
        );
        assert!(ManifestDoc::parse(b"not json").is_none());
    }
}

/// A deterministic, always-run slice of what `fuzz/` does with libFuzzer: mutated pull requests
/// must never panic, and whatever is accepted must satisfy the invariants the server relies on.
#[cfg(test)]
mod mutation_tests {
    use super::*;

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const SEEDS: &[&str] = &[
        "/v2/library/nginx/blobs/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef?ns=docker.io",
        "/v2/a/b/manifests/v1.0?ns=198.18.0.2%3A5000",
        "/v2/a/manifests/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "/blobs/https://r.example/v2/x/blobs/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "/v2/",
    ];
    const ALPHABET: &[u8] = b"/.:-_%?&=abcdefABC0129 \x00\xff";

    fn mutate(rng: &mut XorShift, s: &str) -> String {
        let mut b = s.as_bytes().to_vec();
        for _ in 0..=rng.below(4) {
            let pos = rng.below(b.len() + 1);
            match rng.below(3) {
                0 if pos < b.len() => {
                    b.remove(pos);
                }
                1 => b.insert(pos, ALPHABET[rng.below(ALPHABET.len())]),
                _ if pos < b.len() => b[pos] = ALPHABET[rng.below(ALPHABET.len())],
                _ => {}
            }
        }
        String::from_utf8_lossy(&b).into_owned()
    }

    #[test]
    fn mutated_targets_never_escape_the_grammar() {
        let mut rng = XorShift(0x9e3779b97f4a7c15);
        for i in 0..50_000 {
            let target = mutate(&mut rng, SEEDS[i % SEEDS.len()]);
            match route("GET", &target) {
                Ok(Route::Blob { name, .. } | Route::Manifest { name, .. }) => {
                    assert!(validate_name(&name).is_ok(), "{target}");
                    assert!(!name.contains(".."), "{target}");
                }
                Ok(Route::StreamBlob { digest, .. }) => assert_eq!(digest.hex().len(), 64),
                Ok(Route::ApiVersion) | Err(_) => {}
            }
        }
    }

    #[test]
    fn mutated_ranges_stay_inside_the_blob() {
        let mut rng = XorShift(0x2545f4914f6cdd1d);
        let seeds = ["bytes=0-9", "bytes=10-", "bytes=-5", "bytes=5-2", "bytes=0-0,2-3"];
        for i in 0..50_000 {
            let h = mutate(&mut rng, seeds[i % seeds.len()]);
            let size = rng.below(200) as u64;
            if let Ok(Some(r)) = parse_range(Some(&h), size) {
                assert!(r.start <= r.end && r.end < size, "{h} {size} {r:?}");
            }
        }
    }

    #[test]
    fn mutated_heads_never_panic() {
        let mut rng = XorShift(0xdeadbeefcafef00d);
        let seed = "GET /v2/a/blobs/sha256:00 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\n";
        for _ in 0..50_000 {
            let raw = mutate(&mut rng, seed);
            if let Ok(Some((req, used))) = crate::dataplane::http::parse_head(raw.as_bytes()) {
                assert!(used <= raw.len());
                let _ = route(&req.method_name, &req.target);
            }
        }
    }
}
