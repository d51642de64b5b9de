//! Points containerd at the node-local peerd mirror by writing `hosts.toml`
//! files under containerd's registry `config_path` (usually
//! `/etc/containerd/certs.d`). This backs `peerd configure-containerd` and
//! `peerd run --add-mirror-configuration`.
//!
//! containerd reads `<config_path>/<host[:port]>/hosts.toml` on every pull, so
//! dropping files there takes effect without restarting containerd or editing
//! its main config. Those directories are shared with whatever else manages
//! the node (private registry CAs, other mirrors, the admin), which is why
//! this module is careful rather than just writing files:
//!
//! - A `hosts.toml` we did not write is never overwritten: it is moved aside
//!   to `hosts.toml.peerd-orig` exactly once and put back, byte for byte, by
//!   [`restore`].
//! - Our files start with a marker line so that reruns (every restart of
//!   `peerd run --add-mirror-configuration`) recognise and replace them,
//!   instead of "saving" our own output over the real original.
//! - Files are written to a temp file in the same directory and renamed into
//!   place, because containerd may read them at any moment during a pull and
//!   a half-written file would break pulls on the whole node.
//! - Every input is validated before anything touches the disk, so a typo in
//!   one entry leaves the node exactly as it was.
//! - Directories we create carry a `.peerd-created` file so [`restore`] can
//!   remove those, and only those.

use std::fmt::Write as _;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// First line of every file we write; how reruns and [`restore`] tell our
/// files from everyone else's.
pub const MARKER: &str = "# written by peerd configure-containerd; restore with: peerd configure-containerd --restore";

const HOSTS_FILE: &str = "hosts.toml";
const ORIG_FILE: &str = "hosts.toml.peerd-orig";
const CREATED_MARKER: &str = ".peerd-created";
/// Temp files start with a dot so containerd (which only opens `hosts.toml`)
/// and humans listing the directory both ignore them; the fixed prefix lets
/// [`restore`] clean up leftovers of a crashed run without guessing.
const TMP_PREFIX: &str = ".hosts.toml.peerd-tmp.";
/// Docker Hub images are referenced as `docker.io/...`, but that name does
/// not serve the registry API; containerd's own default upstream is this one.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_UPSTREAM: &str = "https://registry-1.docker.io";
const DIR_MODE: u32 = 0o755;
const FILE_MODE: u32 = 0o644;

/// What to configure: which registries containerd should pull through which
/// mirrors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// Registries to mirror, e.g. `["https://docker.io", "http://198.18.0.2:5000"]`.
    pub hosts: Vec<String>,
    /// Mirror endpoints, tried by containerd in this order, e.g. `["http://localhost:30000"]`.
    pub mirrors: Vec<String>,
    /// containerd's registry `config_path`, e.g. `/etc/containerd/certs.d`.
    pub config_path: PathBuf,
    /// How long containerd waits to connect to a mirror before falling back
    /// to the next one (and finally the upstream); keep it short.
    pub dial_timeout: Duration,
}

/// Why configuring or restoring containerd's `hosts.toml` files failed.
#[derive(Debug, thiserror::Error)]
pub enum HostsConfigError {
    /// No registries were given, so there is nothing to configure.
    #[error("no registries to mirror were given; nothing to configure")]
    NoHosts,
    /// No mirror endpoints were given, so there is nothing to point containerd at.
    #[error("no mirror endpoints were given; nothing to point containerd at")]
    NoMirrors,
    /// A registry or mirror entry is not a plain `http(s)://host[:port]` URL.
    #[error("invalid {role} URL {url:?}: {reason}")]
    InvalidUrl {
        /// `"registry"` or `"mirror"`: which list the entry came from.
        role: &'static str,
        /// The entry exactly as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two registry entries map to the same `host[:port]` directory.
    #[error("registries {first:?} and {second:?} both map to directory {dir:?}")]
    DuplicateHost {
        /// The earlier entry.
        first: String,
        /// The later entry.
        second: String,
        /// The directory name they share.
        dir: String,
    },
    /// A mirror is listed twice, which would make `hosts.toml` invalid TOML.
    #[error("mirror {url:?} is listed more than once")]
    DuplicateMirror {
        /// The repeated entry.
        url: String,
    },
    /// The dial timeout is zero, which containerd would treat as "no timeout".
    #[error("dial timeout must be greater than zero")]
    ZeroDialTimeout,
    /// A path that has to be a directory exists but is something else.
    #[error("{} exists but is not a directory", .path.display())]
    NotADirectory {
        /// The offending path.
        path: PathBuf,
    },
    /// A foreign `hosts.toml` sits next to an already saved original, so writing ours would lose one of them.
    #[error(
        "{} was not written by peerd but an original is already saved as {ORIG_FILE}; move one of them away and retry",
        .path.display()
    )]
    Conflict {
        /// The foreign `hosts.toml`.
        path: PathBuf,
    },
    /// Restore left these `hosts.toml` files and their saved originals alone because both were foreign.
    #[error(
        "not restored, since both a foreign hosts.toml and a saved {ORIG_FILE} exist: {}",
        display_paths(.paths)
    )]
    RestoreConflict {
        /// The foreign `hosts.toml` files that were kept.
        paths: Vec<PathBuf>,
    },
    /// A filesystem operation failed.
    #[error("failed to {op} {}", .path.display())]
    Io {
        /// What was being done, e.g. `"rename"`.
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn display_paths(paths: &[PathBuf]) -> String {
    let mut out = String::new();
    for (i, p) in paths.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{}", p.display());
    }
    out
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> HostsConfigError + 'a {
    move |source| HostsConfigError::Io { op, path: path.to_path_buf(), source }
}

/// Writes one `hosts.toml` per registry in `cfg.hosts`, each pointing at
/// `cfg.mirrors` in order, and returns the files written.
///
/// Safe to rerun: our own files are replaced, a foreign original is saved
/// only the first time. If it fails half-way, the directories already done
/// are consistent and a rerun finishes the job.
///
/// # Errors
///
/// Any invalid entry in `cfg` is reported before anything is written.
/// [`HostsConfigError::Conflict`] if a foreign `hosts.toml` sits next to an
/// already saved original; [`HostsConfigError::Io`] and
/// [`HostsConfigError::NotADirectory`] for filesystem problems.
pub fn configure(cfg: &MirrorConfig) -> Result<Vec<PathBuf>, HostsConfigError> {
    let plans = plan(cfg)?;

    ensure_config_dir(&cfg.config_path)?;
    let mut written = Vec::with_capacity(plans.len());
    for p in &plans {
        let dir = cfg.config_path.join(&p.dir_name);
        prepare_host_dir(&dir)?;
        let path = install_hosts_file(&dir, p.content.as_bytes())?;
        tracing::info!(registry = %p.source, path = %path.display(), "configured containerd mirror");
        written.push(path);
    }
    Ok(written)
}

/// Undoes [`configure`] under `config_path`: removes our `hosts.toml` files,
/// puts saved originals back, and removes directories we created once they
/// are empty. Returns the `hosts.toml` paths removed or restored.
///
/// Files peerd did not write are never touched, and running it again (or on
/// a node never configured) does nothing.
///
/// # Errors
///
/// [`HostsConfigError::RestoreConflict`], after every other directory has
/// been restored, for directories holding both a foreign `hosts.toml` and a
/// saved original; [`HostsConfigError::Io`] and
/// [`HostsConfigError::NotADirectory`] for filesystem problems.
pub fn restore(config_path: &Path) -> Result<Vec<PathBuf>, HostsConfigError> {
    match fs::metadata(config_path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(HostsConfigError::NotADirectory { path: config_path.to_path_buf() }),
        // Nothing was ever configured here, so there is nothing to undo.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("inspect", config_path)(e)),
    }

    let mut dirs = Vec::new();
    for entry in fs::read_dir(config_path).map_err(io_err("list", config_path))? {
        let entry = entry.map_err(io_err("list", config_path))?;
        let path = entry.path();
        // Follow symlinks: configure writes through a symlinked host
        // directory, so restore has to look inside it too.
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => dirs.push(path),
            Ok(_) => {}
            // A dangling symlink cannot hold anything of ours.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspect", &path)(e)),
        }
    }
    // Stable order makes the result and the logs reproducible.
    dirs.sort();

    let mut changed = Vec::new();
    let mut conflicts = Vec::new();
    for dir in &dirs {
        restore_dir(dir, &mut changed, &mut conflicts)?;
    }
    if conflicts.is_empty() {
        Ok(changed)
    } else {
        // Reported only after every other directory was restored, so one
        // conflict does not leave the rest of the node half-configured.
        Err(HostsConfigError::RestoreConflict { paths: conflicts })
    }
}

/// One validated registry, ready to be written.
struct HostPlan {
    source: String,
    dir_name: String,
    content: String,
}

/// Validates all of `cfg` up front so that errors never leave the node
/// partially configured.
fn plan(cfg: &MirrorConfig) -> Result<Vec<HostPlan>, HostsConfigError> {
    if cfg.hosts.is_empty() {
        return Err(HostsConfigError::NoHosts);
    }
    if cfg.mirrors.is_empty() {
        return Err(HostsConfigError::NoMirrors);
    }
    let timeout = format_duration(cfg.dial_timeout)?;

    let mut mirrors: Vec<String> = Vec::with_capacity(cfg.mirrors.len());
    for raw in &cfg.mirrors {
        let url = parse_url("mirror", raw)?.url();
        if mirrors.contains(&url) {
            return Err(HostsConfigError::DuplicateMirror { url: raw.clone() });
        }
        mirrors.push(url);
    }

    let mut plans: Vec<HostPlan> = Vec::with_capacity(cfg.hosts.len());
    for raw in &cfg.hosts {
        let parsed = parse_url("registry", raw)?;
        let dir_name = parsed.authority.clone();
        if let Some(prev) = plans.iter().find(|p| p.dir_name == dir_name) {
            return Err(HostsConfigError::DuplicateHost {
                first: prev.source.clone(),
                second: raw.clone(),
                dir: dir_name,
            });
        }
        let server = if parsed.authority == DOCKER_HUB { DOCKER_HUB_UPSTREAM.to_string() } else { parsed.url() };
        plans.push(HostPlan { source: raw.clone(), content: render(&server, &mirrors, &timeout), dir_name });
    }
    Ok(plans)
}

fn render(server: &str, mirrors: &[String], timeout: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{MARKER}");
    let _ = writeln!(out, "server = {}", toml_quote(server));
    // containerd tries hosts in file order, so the order of `mirrors` is
    // the order of preference.
    for m in mirrors {
        let _ = writeln!(out);
        let _ = writeln!(out, "[host.{}]", toml_quote(m));
        let _ = writeln!(out, "  capabilities = [\"pull\", \"resolve\"]");
        let _ = writeln!(out, "  dial_timeout = {}", toml_quote(timeout));
    }
    out
}

/// Validation already rules out quotes and backslashes; escaping anyway
/// keeps the output valid TOML should validation ever be relaxed.
fn toml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Formats for Go's `time.ParseDuration`, which is what containerd uses.
/// Sub-millisecond parts round up so a tiny timeout never becomes zero.
fn format_duration(d: Duration) -> Result<String, HostsConfigError> {
    if d.is_zero() {
        return Err(HostsConfigError::ZeroDialTimeout);
    }
    if d < Duration::from_secs(1) {
        return Ok(format!("{}ms", d.as_nanos().div_ceil(1_000_000)));
    }
    let millis = d.subsec_millis();
    if millis == 0 {
        return Ok(format!("{}s", d.as_secs()));
    }
    let frac = format!("{millis:03}");
    Ok(format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0')))
}

struct ParsedUrl {
    scheme: &'static str,
    /// `host[:port]` as given; doubles as the `certs.d` directory name,
    /// which is how containerd looks the registry up.
    authority: String,
}

impl ParsedUrl {
    fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }
}

fn parse_url(role: &'static str, raw: &str) -> Result<ParsedUrl, HostsConfigError> {
    let bad = |reason: &'static str| HostsConfigError::InvalidUrl { role, url: raw.to_string(), reason };
    let (scheme, rest) = raw
        .split_once("://")
        .ok_or_else(|| bad("missing scheme; expected http://host[:port] or https://host[:port]"))?;
    let scheme = if scheme.eq_ignore_ascii_case("http") {
        "http"
    } else if scheme.eq_ignore_ascii_case("https") {
        "https"
    } else {
        return Err(bad("scheme must be http or https"));
    };
    // A lone trailing slash is what gets pasted from a browser; it names no
    // path, so accepting it is friendlier than rejecting it.
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(bad("must not contain a path, query or fragment"));
    }
    if authority.contains('@') {
        return Err(bad("must not contain credentials"));
    }
    let (host, port) = split_host_port(authority).map_err(bad)?;
    validate_host(host).map_err(bad)?;
    if let Some(port) = port {
        validate_port(port).map_err(bad)?;
    }
    Ok(ParsedUrl { scheme, authority: authority.to_string() })
}

fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), &'static str> {
    if authority.starts_with('[') {
        let end = authority.find(']').ok_or("unterminated IPv6 address (missing ']')")?;
        let (host, rest) = authority.split_at(end + 1);
        return match rest.strip_prefix(':') {
            Some(port) => Ok((host, Some(port))),
            None if rest.is_empty() => Ok((host, None)),
            None => Err("unexpected characters after IPv6 address"),
        };
    }
    match authority.split_once(':') {
        Some((_, port)) if port.contains(':') => Err("IPv6 addresses must be in brackets"),
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((authority, None)),
    }
}

/// The host becomes a directory name under `config_path`, so besides being
/// a plausible host it must not be able to escape that directory.
fn validate_host(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("host is empty");
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ok = inner.contains(':') && inner.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.');
        return if ok { Ok(()) } else { Err("invalid IPv6 address") };
    }
    if !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
        return Err("host contains characters not allowed in a host name");
    }
    if host.starts_with('.') || host.ends_with('.') || host.contains("..") {
        return Err("host has an empty label");
    }
    Ok(())
}

fn validate_port(port: &str) -> Result<(), &'static str> {
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err("port must be a number");
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err("port must be between 1 and 65535"),
    }
}

fn ensure_config_dir(path: &Path) -> Result<(), HostsConfigError> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path).map_err(io_err("create directory", path))?;
    // create() with recursive(true) also succeeds on an existing directory
    // but not on a file; a symlink to a file still needs catching.
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(HostsConfigError::NotADirectory { path: path.to_path_buf() }),
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

fn prepare_host_dir(dir: &Path) -> Result<(), HostsConfigError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => return Err(HostsConfigError::NotADirectory { path: dir.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect", dir)(e)),
    }
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        // Someone else created it in the meantime, so it is not ours to
        // remove later.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return prepare_host_dir(dir),
        Err(e) => return Err(io_err("create directory", dir)(e)),
    }
    // The umask may have stripped bits; containerd and admins expect 0755.
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE)).map_err(io_err("set permissions on", dir))?;
    let tmp =
        write_temp(dir, b"created by peerd configure-containerd; removed by peerd configure-containerd --restore\n")?;
    let marker = dir.join(CREATED_MARKER);
    rename_or_cleanup(&tmp, &marker)
}

/// Puts `content` at `dir/hosts.toml`, saving a foreign original first.
fn install_hosts_file(dir: &Path, content: &[u8]) -> Result<PathBuf, HostsConfigError> {
    let target = dir.join(HOSTS_FILE);
    let orig = dir.join(ORIG_FILE);
    // Prepared before anything is moved so the window without any
    // hosts.toml is a single rename.
    let tmp = write_temp(dir, content)?;
    if let Err(e) = save_original(&target, &orig) {
        remove_quietly(&tmp);
        return Err(e);
    }
    rename_or_cleanup(&tmp, &target)?;
    sync_dir(dir);
    Ok(target)
}

fn save_original(target: &Path, orig: &Path) -> Result<(), HostsConfigError> {
    if !exists_nofollow(target)? || is_ours(target)? {
        return Ok(());
    }
    if exists_nofollow(orig)? {
        return Err(HostsConfigError::Conflict { path: target.to_path_buf() });
    }
    // rename keeps the inode, so bytes, mode and owner survive untouched.
    fs::rename(target, orig).map_err(io_err("move aside", target))?;
    tracing::info!(original = %target.display(), saved = %orig.display(), "saved existing hosts.toml");
    Ok(())
}

fn restore_dir(dir: &Path, changed: &mut Vec<PathBuf>, conflicts: &mut Vec<PathBuf>) -> Result<(), HostsConfigError> {
    let target = dir.join(HOSTS_FILE);
    let orig = dir.join(ORIG_FILE);
    remove_stale_temps(dir)?;

    let mut touched = false;
    if is_ours(&target)? {
        fs::remove_file(&target).map_err(io_err("remove", &target))?;
        tracing::info!(path = %target.display(), "removed peerd hosts.toml");
        touched = true;
    }
    if exists_nofollow(&orig)? {
        if exists_nofollow(&target)? {
            // Someone replaced our file after configure; either file may be
            // the one they want, so keep both and let a human decide.
            tracing::warn!(path = %target.display(), saved = %orig.display(),
                "foreign hosts.toml and saved original both exist; leaving both");
            conflicts.push(target.clone());
        } else {
            fs::rename(&orig, &target).map_err(io_err("restore", &orig))?;
            tracing::info!(path = %target.display(), "restored original hosts.toml");
            touched = true;
        }
    }
    if touched {
        sync_dir(dir);
        changed.push(target);
    }

    let created = dir.join(CREATED_MARKER);
    if exists_nofollow(&created)? {
        // Dropped even when the directory stays: whatever is left in it is
        // someone else's now, so the directory is no longer ours to remove.
        fs::remove_file(&created).map_err(io_err("remove", &created))?;
        match fs::remove_dir(dir) {
            Ok(()) => tracing::info!(dir = %dir.display(), "removed directory created by peerd"),
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                tracing::info!(dir = %dir.display(), "keeping directory: it holds files peerd did not write");
            }
            Err(e) => return Err(io_err("remove directory", dir)(e)),
        }
    }
    Ok(())
}

fn remove_stale_temps(dir: &Path) -> Result<(), HostsConfigError> {
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
        }
    }
    Ok(())
}

/// Ours means: a regular file (never a symlink, whose target could be
/// anyone's) whose first line is exactly [`MARKER`].
fn is_ours(path: &Path) -> Result<bool, HostsConfigError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("inspect", path)(e)),
    }
    let mut head = Vec::with_capacity(MARKER.len() + 2);
    let read = File::open(path).and_then(|f| f.take(MARKER.len() as u64 + 2).read_to_end(&mut head).map(|_| ()));
    match read {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("read", path)(e)),
    }
    Ok(head.strip_prefix(MARKER.as_bytes()).is_some_and(|rest| rest.starts_with(b"\n") || rest.starts_with(b"\r\n")))
}

/// Does not follow symlinks, so a dangling symlink still counts as
/// something that must not be overwritten.
fn exists_nofollow(path: &Path) -> Result<bool, HostsConfigError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

/// Writes a fully synced 0644 temp file in `dir`, ready to be renamed into
/// place; same directory so the rename stays on one filesystem and is atomic.
fn write_temp(dir: &Path, content: &[u8]) -> Result<PathBuf, HostsConfigError> {
    // pid + counter keeps concurrent writers (other processes, other
    // threads) from clobbering each other's temp files.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!("{TMP_PREFIX}{}.{n}", std::process::id()));
    // A leftover with this name can only be from a crashed run of ours that
    // had the same pid; clearing it lets create_new below succeed.
    remove_quietly(&tmp);
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(&tmp).map_err(io_err("create", &tmp))?;
    let res = file
        .write_all(content)
        // The umask may have stripped bits from `mode` above.
        .and_then(|()| file.set_permissions(Permissions::from_mode(FILE_MODE)))
        .and_then(|()| file.sync_all());
    if let Err(e) = res {
        drop(file);
        remove_quietly(&tmp);
        return Err(io_err("write", &tmp)(e));
    }
    Ok(tmp)
}

fn rename_or_cleanup(tmp: &Path, dest: &Path) -> Result<(), HostsConfigError> {
    fs::rename(tmp, dest).map_err(|e| {
        remove_quietly(tmp);
        io_err("write", dest)(e)
    })
}

fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::debug!(path = %path.display(), error = %e, "could not remove temp file");
        }
    }
}

/// Makes the renames durable across a power cut. Best effort: some
/// filesystems refuse fsync on directories, and the files themselves are
/// already synced.
fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "could not sync directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// std-only temp dir so these tests need no extra dev-dependency.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "peerd-hosts-config-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(root: &Path, hosts: &[&str], mirrors: &[&str]) -> MirrorConfig {
        MirrorConfig {
            hosts: hosts.iter().map(ToString::to_string).collect(),
            mirrors: mirrors.iter().map(ToString::to_string).collect(),
            config_path: root.join("certs.d"),
            dial_timeout: Duration::from_millis(200),
        }
    }

    fn parse(path: &Path) -> toml::Table {
        let text = fs::read_to_string(path).expect("read hosts.toml");
        text.parse::<toml::Table>().expect("valid TOML")
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    /// Every file under `dir`, relative, with its bytes: a full snapshot
    /// to compare before/after.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).expect("read_dir") {
                let p = e.expect("entry").path();
                if p.is_dir() {
                    out.push((p.strip_prefix(dir).unwrap().to_path_buf(), Vec::new()));
                    stack.push(p);
                } else {
                    let bytes = fs::read(&p).expect("read");
                    out.push((p.strip_prefix(dir).unwrap().to_path_buf(), bytes));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn fresh_write() {
        let tmp = TempDir::new();
        let c = cfg(
            tmp.path(),
            &["https://docker.io", "https://ghcr.io", "http://198.18.0.2:5000"],
            &["http://localhost:30000"],
        );
        let written = configure(&c).expect("configure");
        let root = &c.config_path;
        assert_eq!(
            written,
            vec![
                root.join("docker.io/hosts.toml"),
                root.join("ghcr.io/hosts.toml"),
                root.join("198.18.0.2:5000/hosts.toml"),
            ]
        );
        for path in &written {
            let text = fs::read_to_string(path).unwrap();
            assert_eq!(text.lines().next(), Some(MARKER));
            let t = parse(path);
            let host = t["host"].as_table().unwrap();
            assert_eq!(host.len(), 1);
            let m = host["http://localhost:30000"].as_table().unwrap();
            assert_eq!(m["capabilities"], toml::Value::Array(vec!["pull".into(), "resolve".into()]));
            assert_eq!(m["dial_timeout"].as_str(), Some("200ms"));
            assert_eq!(mode(path), 0o644);
            let dir = path.parent().unwrap();
            assert_eq!(mode(dir), 0o755);
            assert!(dir.join(CREATED_MARKER).exists());
            assert!(!dir.join(ORIG_FILE).exists());
        }
        // No temp files left behind.
        for path in &written {
            for e in fs::read_dir(path.parent().unwrap()).unwrap() {
                let name = e.unwrap().file_name();
                assert!(!name.to_string_lossy().starts_with(TMP_PREFIX));
            }
        }
    }

    #[test]
    fn server_mapping() {
        let tmp = TempDir::new();
        let c = cfg(
            tmp.path(),
            &["https://docker.io", "https://ghcr.io/", "http://198.18.0.2:5000", "HTTPS://registry.k8s.io"],
            &["http://localhost:30000"],
        );
        configure(&c).unwrap();
        let server =
            |dir: &str| parse(&c.config_path.join(dir).join(HOSTS_FILE))["server"].as_str().unwrap().to_string();
        assert_eq!(server("docker.io"), "https://registry-1.docker.io");
        assert_eq!(server("ghcr.io"), "https://ghcr.io");
        assert_eq!(server("198.18.0.2:5000"), "http://198.18.0.2:5000");
        assert_eq!(server("registry.k8s.io"), "https://registry.k8s.io");
    }

    #[test]
    fn original_moved_aside_and_restored_byte_exact() {
        let tmp = TempDir::new();
        let c = cfg(tmp.path(), &["https://docker.io"], &["http://localhost:30000"]);
        let dir = c.config_path.join("docker.io");
        fs::create_dir_all(&dir).unwrap();
        // Not UTF-8 and no trailing newline: must survive exactly.
        let original: &[u8] = b"server = \"https://mine.example\"\n# \xff\xfe keep";
        let hosts = dir.join(HOSTS_FILE);
        fs::write(&hosts, original).unwrap();
        fs::set_permissions(&hosts, Permissions::from_mode(0o600)).unwrap();
        let before = snapshot(tmp.path());

        configure(&c).unwrap();
        assert_eq!(fs::read(dir.join(ORIG_FILE)).unwrap(), original);
        assert!(is_ours(&hosts).unwrap());
        // The directory already existed, so it is not ours to remove.
        assert!(!dir.join(CREATED_MARKER).exists());

        let restored = restore(&c.config_path).unwrap();
        assert_eq!(restored, vec![hosts.clone()]);
        assert_eq!(fs::read(&hosts).unwrap(), original);
        assert_eq!(mode(&hosts), 0o600);
        assert_eq!(snapshot(tmp.path()), before);
    }

    #[test]
    fn configure_twice_then_restore_gives_original() {
        let tmp = TempDir::new();
        let mut c = cfg(tmp.path(), &["https://docker.io", "https://quay.io"], &["http://localhost:30000"]);
        let dir = c.config_path.join("docker.io");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(HOSTS_FILE), b"original\n").unwrap();
        let before = snapshot(tmp.path());

        let first = configure(&c).unwrap();
        let first_text = fs::read(&first[0]).unwrap();
        let second = configure(&c).unwrap();
        assert_eq!(first, second);
        assert_eq!(fs::read(&second[0]).unwrap(), first_text);
        // A rerun must not have saved our own file over the original.
        assert_eq!(fs::read(dir.join(ORIG_FILE)).unwrap(), b"original\n");

        // A rerun with different settings replaces our file too.
        c.dial_timeout = Duration::from_secs(2);
        configure(&c).unwrap();
        assert_eq!(parse(&dir.join(HOSTS_FILE))["host"]["http://localhost:30000"]["dial_timeout"].as_str(), Some("2s"));
        assert_eq!(fs::read(dir.join(ORIG_FILE)).unwrap(), b"original\n");

        restore(&c.config_path).unwrap();
        assert_eq!(snapshot(tmp.path()), before);
        // Idempotent: a second restore has nothing left to do.
        assert_eq!(restore(&c.config_path).unwrap(), Vec::<PathBuf>::new());
        assert_eq!(snapshot(tmp.path()), before);
    }

    #[test]
    fn restore_with_nothing_to_do() {
        let tmp = TempDir::new();
        let root = tmp.path().join("certs.d");
        // Missing config_path: nothing was ever configured.
        assert!(restore(&root).unwrap().is_empty());
        assert!(!root.exists());

        // Foreign files and empty directories are left exactly as they are.
        fs::create_dir_all(root.join("ghcr.io")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::write(root.join("ghcr.io").join(HOSTS_FILE), b"foreign").unwrap();
        fs::write(root.join("stray-file"), b"x").unwrap();
        let before = snapshot(tmp.path());
        assert!(restore(&root).unwrap().is_empty());
        assert_eq!(snapshot(tmp.path()), before);

        // config_path that is a file is an error, not silently ignored.
        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(restore(&file), Err(HostsConfigError::NotADirectory { .. })));
    }

    #[test]
    fn restore_removes_created_dirs_but_keeps_user_files() {
        let tmp = TempDir::new();
        let c = cfg(tmp.path(), &["https://ghcr.io", "https://quay.io"], &["http://localhost:30000"]);
        configure(&c).unwrap();
        let user_file = c.config_path.join("quay.io").join("ca.crt");
        fs::write(&user_file, b"cert").unwrap();
        // Leftover of a crashed write.
        fs::write(c.config_path.join("ghcr.io").join(format!("{TMP_PREFIX}1.0")), b"partial").unwrap();

        let restored = restore(&c.config_path).unwrap();
        assert_eq!(restored.len(), 2);
        assert!(!c.config_path.join("ghcr.io").exists());
        assert!(c.config_path.is_dir());
        assert_eq!(fs::read(&user_file).unwrap(), b"cert");
        assert!(!c.config_path.join("quay.io").join(HOSTS_FILE).exists());
        assert!(!c.config_path.join("quay.io").join(CREATED_MARKER).exists());
    }

    #[test]
    fn foreign_file_next_to_saved_original_is_a_conflict() {
        let tmp = TempDir::new();
        let c = cfg(tmp.path(), &["https://docker.io"], &["http://localhost:30000"]);
        let dir = c.config_path.join("docker.io");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(HOSTS_FILE), b"newer foreign").unwrap();
        fs::write(dir.join(ORIG_FILE), b"saved original").unwrap();
        let before = snapshot(tmp.path());

        let err = configure(&c).unwrap_err();
        assert!(matches!(err, HostsConfigError::Conflict { .. }), "{err}");
        assert_eq!(snapshot(tmp.path()), before);

        let err = restore(&c.config_path).unwrap_err();
        match err {
            HostsConfigError::RestoreConflict { paths } => {
                assert_eq!(paths, vec![dir.join(HOSTS_FILE)]);
            }
            other => panic!("unexpected {other}"),
        }
        assert_eq!(snapshot(tmp.path()), before);
    }

    #[test]
    fn bad_input_errors_and_touches_nothing() {
        let tmp = TempDir::new();
        let bad_hosts = [
            "docker.io",
            "ftp://docker.io",
            "https://",
            "https://docker.io/v2/",
            "https://docker.io?x=1",
            "https://docker.io#frag",
            "https://user:pw@docker.io",
            "https://docker.io:",
            "https://docker.io:0",
            "https://docker.io:65536",
            "https://docker.io:abc",
            "https://..",
            "https://.",
            "https://a..b",
            "https://doc ker.io",
            "https://doc\"ker.io",
            "https://::1",
            "https://[::1",
            "https://[zz]:5000",
            "https://[::1]x",
        ];
        for bad in bad_hosts {
            let c = cfg(tmp.path(), &[bad], &["http://localhost:30000"]);
            let err = configure(&c).expect_err(bad);
            match &err {
                HostsConfigError::InvalidUrl { role, url, .. } => {
                    assert_eq!(*role, "registry");
                    assert_eq!(url, bad);
                }
                other => panic!("{bad}: expected InvalidUrl, got {other:?}"),
            }
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let c = cfg(tmp.path(), &["https://docker.io"], &["localhost:30000"]);
        assert!(matches!(configure(&c), Err(HostsConfigError::InvalidUrl { role: "mirror", .. })));

        // A bad entry late in the list must not leave earlier ones written.
        let c = cfg(tmp.path(), &["https://docker.io", "https://bad/path"], &["http://localhost:30000"]);
        assert!(configure(&c).is_err());

        let c = cfg(tmp.path(), &[], &["http://localhost:30000"]);
        assert!(matches!(configure(&c), Err(HostsConfigError::NoHosts)));
        let c = cfg(tmp.path(), &["https://docker.io"], &[]);
        assert!(matches!(configure(&c), Err(HostsConfigError::NoMirrors)));
        let c = cfg(tmp.path(), &["https://docker.io", "http://docker.io/"], &["http://localhost:30000"]);
        assert!(matches!(configure(&c), Err(HostsConfigError::DuplicateHost { .. })));
        let c = cfg(tmp.path(), &["https://docker.io"], &["http://localhost:30000", "http://localhost:30000/"]);
        assert!(matches!(configure(&c), Err(HostsConfigError::DuplicateMirror { .. })));
        let mut c = cfg(tmp.path(), &["https://docker.io"], &["http://localhost:30000"]);
        c.dial_timeout = Duration::ZERO;
        assert!(matches!(configure(&c), Err(HostsConfigError::ZeroDialTimeout)));

        assert!(!tmp.path().join("certs.d").exists());
    }

    #[test]
    fn config_path_or_host_dir_not_a_directory() {
        let tmp = TempDir::new();
        let c = cfg(tmp.path(), &["https://docker.io"], &["http://localhost:30000"]);
        fs::create_dir_all(&c.config_path).unwrap();
        fs::write(c.config_path.join("docker.io"), b"").unwrap();
        assert!(matches!(configure(&c), Err(HostsConfigError::NotADirectory { .. })));
    }

    #[test]
    fn multiple_mirrors_keep_order() {
        let tmp = TempDir::new();
        let mirrors = ["http://localhost:30000", "https://[fd00::1]:30001", "http://127.0.0.1:30002"];
        let c = cfg(tmp.path(), &["https://ghcr.io"], &mirrors);
        let written = configure(&c).unwrap();
        let text = fs::read_to_string(&written[0]).unwrap();
        let positions: Vec<usize> =
            mirrors.iter().map(|m| text.find(&format!("[host.\"{m}\"]")).expect("mirror table")).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
        let t = parse(&written[0]);
        let host = t["host"].as_table().unwrap();
        assert_eq!(host.len(), 3);
        for m in mirrors {
            assert_eq!(host[m]["capabilities"].as_array().unwrap().len(), 2);
        }
    }

    #[test]
    fn durations_format_for_go() {
        let f = |d| format_duration(d).unwrap();
        assert_eq!(f(Duration::from_millis(200)), "200ms");
        assert_eq!(f(Duration::from_micros(1)), "1ms");
        assert_eq!(f(Duration::from_micros(999_500)), "1000ms");
        assert_eq!(f(Duration::from_secs(1)), "1s");
        assert_eq!(f(Duration::from_millis(1500)), "1.5s");
        assert_eq!(f(Duration::from_millis(2050)), "2.05s");
        assert_eq!(f(Duration::from_secs(30)), "30s");
    }
}
