//! Where peerd may fetch from on a client's behalf.
//!
//! Pull-through downloads a URL that a request names (the `/blobs/<url>` streaming path) or that
//! peerd builds from the `ns=` registry. Anyone who reaches the data plane can ask, and a client
//! that streams a response sees every byte but the last before the digest is checked, so the
//! destination itself is checked, or peerd would read internal services for whoever asks:
//!
//! - a registry that `--hosts` names is trusted as the operator configured it, whatever its
//!   address (a registry on `localhost` or in the cluster network is a deliberate choice);
//! - when `--hosts` names registries, nothing else is fetched (redirects to blob storage aside);
//! - when `--hosts` allows all, only `https`, and never to this node itself, link-local addresses
//!   (cloud metadata services live at 169.254.169.254), unspecified, multicast or broadcast
//!   addresses: neither as IP literals, nor behind a name (the resolver drops such answers), nor
//!   through a redirect;
//! - the digest must still be in the path after `.` and `..` segments are resolved, so that
//!   `/sha256:<hex>/../<anything>` cannot borrow a digest for another resource.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use url::Url;

use crate::oci::Digest;

/// The destinations pull-through may reach.
#[derive(Clone, Debug, Default)]
pub struct Egress {
    /// Hosts (no port) of the registries `--hosts` names, and of their API endpoints.
    trusted_hosts: Vec<String>,
    /// `host[:port]` that `--hosts` names (and their API endpoints); empty means all.
    authorities: Vec<String>,
}

impl Egress {
    /// `upstreams` is `--hosts` as (`host[:port]`, API base URL) pairs; empty allows all.
    pub fn new(upstreams: &[(String, String)]) -> Self {
        let mut authorities = Vec::new();
        for (registry, base) in upstreams {
            authorities.push(registry.to_ascii_lowercase());
            if let Ok(u) = Url::parse(base) {
                authorities.push(authority(&u));
            }
        }
        authorities.sort();
        authorities.dedup();
        let mut trusted_hosts: Vec<String> = authorities.iter().map(|a| host_of(a).to_owned()).collect();
        trusted_hosts.sort();
        trusted_hosts.dedup();
        Self { trusted_hosts, authorities }
    }

    /// Checks a URL a client asked peerd to fetch `digest` from, and returns it normalised (the
    /// form that is then fetched).
    pub fn check(&self, raw: &str, digest: &Digest) -> Result<Url, &'static str> {
        let url = Url::parse(raw).map_err(|_| "not a valid URL")?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("only http and https URLs are fetched");
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("URLs with credentials are not fetched");
        }
        if url.host().is_none() {
            return Err("the URL has no host");
        }
        if !carries_digest(&url, digest) {
            return Err("the URL's path does not carry the digest");
        }
        if self.authorities.is_empty() {
            if url.scheme() != "https" {
                return Err("with --hosts allowing all registries, only https URLs are fetched");
            }
            if let Some(ip) = ip_literal(&url) {
                if forbidden(ip) {
                    return Err("the URL points at a local, link-local or broadcast address");
                }
            }
            Ok(url)
        } else if self.authorities.contains(&authority(&url)) {
            Ok(url)
        } else {
            Err("the URL's host is not one of the registries --hosts names")
        }
    }

    /// Whether `host` (a name or an IP literal, no port) is a registry `--hosts` names.
    fn trusted(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.trusted_hosts.iter().any(|h| h.trim_start_matches('[').trim_end_matches(']').eq_ignore_ascii_case(host))
    }

    /// Whether a redirect may be followed to `url`.
    pub fn redirect_allowed(&self, url: &Url) -> Result<(), &'static str> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err("redirect to a scheme other than http(s)");
        }
        match (url.host_str(), ip_literal(url)) {
            (Some(h), Some(ip)) if forbidden(ip) && !self.trusted(h) => {
                Err("redirect to a local, link-local or broadcast address")
            }
            (None, _) => Err("redirect without a host"),
            _ => Ok(()),
        }
    }

    /// A resolver for the upstream client that drops forbidden answers for untrusted names.
    pub fn resolver(&self) -> Arc<Resolver> {
        Arc::new(Resolver { egress: self.clone() })
    }
}

/// Whether peerd must not connect to `ip` on a client's behalf (unless `--hosts` names it).
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => forbidden(IpAddr::V4(v4)),
            None => v6.is_loopback() || v6.is_unicast_link_local() || v6.is_unspecified() || v6.is_multicast(),
        },
    }
}

/// The URL's host when it is an IP address (in any of the forms the URL parser accepts).
pub fn ip_literal(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
        url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
        url::Host::Domain(_) => None,
    }
}

/// `host[:port]` as `--hosts` spells it (the port only when it is not the scheme's default).
fn authority(url: &Url) -> String {
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}

fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority)
}

/// Whether a segment of the (normalised) path is `sha256:<hex>` of `digest`.
fn carries_digest(url: &Url, digest: &Digest) -> bool {
    let want = digest.to_string();
    url.path_segments().is_some_and(|mut segs| {
        segs.any(|s| {
            let s = s.replace("%3A", ":").replace("%3a", ":");
            s == want
        })
    })
}

/// The upstream client's resolver: the system's, minus forbidden addresses for names that
/// `--hosts` does not name.
pub struct Resolver {
    egress: Egress,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let trusted = self.egress.trusted(&host);
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found.iter().copied().filter(|a| trusted || !forbidden(a.ip())).collect();
            if kept.is_empty() && !found.is_empty() {
                let why = format!("{host} resolves only to local or link-local addresses; not fetched");
                return Err(why.into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Digest {
        Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap()
    }

    fn all() -> Egress {
        Egress::new(&[])
    }

    fn lab() -> Egress {
        Egress::new(&[
            ("198.18.0.2:5000".into(), "http://198.18.0.2:5000".into()),
            ("docker.io".into(), "https://registry-1.docker.io".into()),
            ("localhost:5001".into(), "http://localhost:5001".into()),
        ])
    }

    #[test]
    fn a_registry_url_with_the_digest_is_fetched() {
        let u = format!("https://ghcr.io/v2/a/b/blobs/{}", d());
        assert_eq!(all().check(&u, &d()).unwrap().as_str(), u);
        let u = format!("http://198.18.0.2:5000/v2/a/blobs/{}", d());
        assert!(lab().check(&u, &d()).is_ok());
        let u = format!("https://registry-1.docker.io/v2/library/x/blobs/{}", d());
        assert!(lab().check(&u, &d()).is_ok(), "a configured registry's API host");
        let u = format!("http://localhost:5001/v2/x/blobs/{}", d());
        assert!(lab().check(&u, &d()).is_ok(), "a configured local registry is the operator's choice");
        let u = format!("https://ghcr.io/v2/x/blobs/sha256%3A{}", "a".repeat(64));
        assert!(all().check(&u, &d()).is_ok(), "an encoded colon");
    }

    #[test]
    fn metadata_services_and_local_addresses_are_refused() {
        for host in
            ["169.254.169.254", "127.0.0.1", "[::1]", "0.0.0.0", "[::ffff:169.254.169.254]", "[fe80::1]", "224.0.0.1"]
        {
            let u = format!("https://{host}/v2/x/blobs/{}", d());
            assert!(all().check(&u, &d()).is_err(), "{u} must be refused");
        }
        let u = format!("http://ghcr.io/v2/x/blobs/{}", d());
        assert!(all().check(&u, &d()).is_err(), "plain http to an unconfigured host");
        let u = format!("http://169.254.169.254/v2/x/blobs/{}", d());
        assert!(lab().check(&u, &d()).is_err(), "a host --hosts does not name");
        let u = format!("https://user:pw@ghcr.io/v2/x/blobs/{}", d());
        assert!(all().check(&u, &d()).is_err(), "credentials in the URL");
        let u = format!("file:///etc/sha256:{}", "a".repeat(64));
        assert!(all().check(&u, &d()).is_err(), "a file URL");
    }

    #[test]
    fn the_digest_must_survive_normalisation() {
        for path in [
            format!("/{}/../latest/meta-data", d()),
            format!("/{}/%2e%2e/latest/meta-data", d()),
            format!("/{}/%2E%2E/x", d()),
            "/v2/x/blobs/sha256:bbbb".to_owned(),
            "/v2/x/manifests/latest".to_owned(),
        ] {
            let u = format!("https://ghcr.io{path}");
            assert!(all().check(&u, &d()).is_err(), "{u} must be refused");
        }
        let u = format!("https://ghcr.io/v2/x/./blobs/{}", d());
        assert_eq!(all().check(&u, &d()).unwrap().path(), format!("/v2/x/blobs/{}", d()));
    }

    #[test]
    fn redirects_to_local_addresses_are_refused_unless_configured() {
        let to = |s: &str| Url::parse(s).unwrap();
        assert!(all().redirect_allowed(&to("https://s3.amazonaws.com/b/x")).is_ok());
        assert!(all().redirect_allowed(&to("http://169.254.169.254/latest")).is_err());
        assert!(all().redirect_allowed(&to("http://[::1]:8080/")).is_err());
        assert!(lab().redirect_allowed(&to("http://198.18.0.2:5000/x")).is_ok());
        assert!(all().redirect_allowed(&to("ftp://x/")).is_err());
    }

    #[test]
    fn forbidden_addresses() {
        for ip in ["127.0.0.53", "169.254.1.1", "::1", "fe80::2", "::ffff:127.0.0.1", "255.255.255.255", "ff02::1"] {
            assert!(forbidden(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.1", "198.18.0.2", "192.168.1.1", "8.8.8.8", "fd00::1", "2001:db8::1"] {
            assert!(!forbidden(ip.parse().unwrap()), "{ip}");
        }
    }
}
