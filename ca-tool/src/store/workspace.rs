//! A private temporary directory laid out like a CA directory, for running
//! a command against PostgreSQL (see [`super`]), and the file-level work of
//! moving the layout in and out of it: which files are documents and which
//! are keys, scanning, and writing them atomically.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use crate::ca::files;
use crate::fsutil::{self, PUBLIC, SECRET};

use super::StoreError;

/// A checked-out copy of the state. Dropped without checkin, nothing is
/// written anywhere (and the advisory lock, if held, is released).
pub struct Workspace {
    pub(crate) dir: tempfile::TempDir,
    /// The generation checked out.
    pub(crate) generation: i64,
    /// Documents as checked out, by relative path.
    pub(crate) docs: BTreeMap<String, Vec<u8>>,
    /// Key files as checked out, by relative path.
    pub(crate) keys: BTreeMap<String, Vec<u8>>,
    /// The key directory's key files as last read (before resolution).
    pub(crate) dir_keys: BTreeMap<String, Vec<u8>>,
    /// Documents put in the workspace over the stored ones: `serve`
    /// running on the previous intermediate (see [`resolve_keys`]).
    pub(crate) fallback: BTreeMap<String, Vec<u8>>,
    /// Checked out by [`super::PgStore::checkout_serve`]: no root keys, and
    /// [`resolve_keys`] may fall back to the previous intermediate.
    pub(crate) serve: bool,
    /// Bytes of `ledger.jsonl` and `tokens.jsonl` at checkout: what follows
    /// was written by the command.
    pub(crate) ledger_len: u64,
    pub(crate) tokens_len: u64,
    /// The connection holding the advisory lock of an exclusive checkout
    /// (closing it releases the lock).
    pub(crate) lock: Option<Box<super::pg::LockConn>>,
}

impl Workspace {
    /// The directory to run the command on.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The generation checked out.
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// Whether this (`serve`) workspace runs on the previous intermediate
    /// because the current one's key is not in the key directory yet: the
    /// replica lags the store.
    pub fn fallback(&self) -> bool {
        !self.fallback.is_empty()
    }

    /// The trust domain of the CA checked out (from `ca.json`), `None` when
    /// the store holds no CA yet.
    pub fn trust_domain(&self) -> Option<String> {
        let body = self.docs.get(files::STATE)?;
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        Some(
            v.get("trust_domain")
                .and_then(|t| t.as_str())
                .unwrap_or("?")
                .to_owned(),
        )
    }
}

/// What a file of the layout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A private key: stays in the key directory, never in the database.
    Key,
    /// `ledger.jsonl`: the `ledger` table.
    Ledger,
    /// `tokens.jsonl`: the `join_tokens` table.
    Tokens,
    /// Anything else: a row of `ca_documents`.
    Document,
}

/// Classifies a relative path of the layout. Any name ending in `.key`, in
/// any case, is a key: such a name never comes from the database.
pub(crate) fn kind(rel: &str) -> Kind {
    if rel.to_ascii_lowercase().ends_with(".key") {
        Kind::Key
    } else if rel == files::LEDGER {
        Kind::Ledger
    } else if rel == files::TOKENS {
        Kind::Tokens
    } else {
        Kind::Document
    }
}

/// The key files to put in a workspace, from the documents and the key
/// files of the key directory (`dir_keys`), resolved by content: for each
/// certificate of the layout whose key is a file (`ca.json` says), if the
/// key file of the same name is not that certificate's key, the key file of
/// the key directory that is (in `archive/`, `next/`, anywhere) is put
/// under the expected name. So a key directory one step ahead of the
/// documents (a rotation killed between its key write and its commit; a
/// Secret updated before or after the documents) still yields a workspace
/// whose keys match its certificates. `serve` (`read_only`) gets no root
/// keys: it never signs with them.
///
/// For `serve` only, when no key file is the key of `intermediate.crt`
/// (its key has not reached this replica yet), the second map holds the
/// documents to put over the stored ones so that it serves the previous,
/// still valid chain: the newest archived intermediate certificate that
/// is unexpired, signed by the current `root.crt`, and whose key is here.
/// One-shot commands never fall back: they fail as before.
#[allow(clippy::type_complexity)]
pub(crate) fn resolve_keys(
    docs: &BTreeMap<String, Vec<u8>>,
    dir_keys: &BTreeMap<String, Vec<u8>>,
    read_only: bool,
) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, Vec<u8>>) {
    let mut keys = dir_keys.clone();
    let mut over = BTreeMap::new();
    // A workspace is a copy in /tmp, outside the key directory the operator
    // protects, and a killed process leaves it until the next start sweeps
    // it: it holds no root key nothing will sign with. Archived root keys
    // are never used; `serve` uses no root key at all.
    keys.retain(|n, _| {
        let root = is_root_key(n);
        !(root && (read_only || n.starts_with("archive/")))
    });
    let Some(locs) = docs
        .get(files::STATE)
        .and_then(|b| serde_json::from_slice::<crate::ca::CaState>(b).ok())
        .map(|s| s.keys)
    else {
        return (keys, over);
    };
    let mut spkis: Option<Vec<(&String, Vec<u8>)>> = None;
    let stems = [
        ("root", &locs.root, !read_only),
        ("intermediate", &locs.intermediate, true),
        ("next/root", &locs.next_root, !read_only),
        ("next/intermediate", &locs.next_intermediate, true),
    ];
    for (stem, loc, wanted) in stems {
        if !wanted || !loc.is_file() {
            continue;
        }
        let Some(cert_spki) = docs.get(&format!("{stem}.crt")).and_then(|b| cert_spki(b)) else {
            continue;
        };
        let name = format!("{stem}.key");
        if keys.get(&name).and_then(|k| key_spki(k)).as_ref() == Some(&cert_spki) {
            continue;
        }
        let spkis = spkis.get_or_insert_with(|| {
            dir_keys
                .iter()
                .filter_map(|(n, b)| Some((n, key_spki(b)?)))
                .collect()
        });
        if let Some((from, _)) = spkis.iter().find(|(_, s)| *s == cert_spki) {
            tracing::warn!(
                "the key directory's {name} is not the key of {stem}.crt; using {from}, which is"
            );
            keys.insert(name, dir_keys[*from].clone());
        } else if read_only && stem == "intermediate" {
            if let Some((crt, key)) = previous_intermediate(docs, spkis, dir_keys) {
                tracing::warn!(
                    archived = %crt,
                    "no file of the key directory is the key of intermediate.crt (yet): serving \
                     the previous intermediate, {crt}, until it arrives"
                );
                over.insert(files::INT_CRT.to_owned(), docs[crt].clone());
                keys.insert(name, key);
            }
        }
    }
    (keys, over)
}

/// Whether a key file of the layout is a root's: `root.key`,
/// `next/root.key`, or an archived `archive/<time>-root.key`.
pub(crate) fn is_root_key(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name == files::ROOT_KEY || name.ends_with("-root.key")
}

/// The newest archived intermediate certificate (name, its key) that is
/// unexpired, signed by the current `root.crt`, and whose key is in the
/// key directory.
fn previous_intermediate<'a>(
    docs: &'a BTreeMap<String, Vec<u8>>,
    spkis: &[(&String, Vec<u8>)],
    dir_keys: &BTreeMap<String, Vec<u8>>,
) -> Option<(&'a String, Vec<u8>)> {
    let root_der = first_der(docs.get(files::ROOT_CRT)?)?;
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).ok()?;
    // Archive names start with a fixed-width time: newest last.
    for (name, body) in docs.iter().rev() {
        if !(name.starts_with("archive/") && name.ends_with("-intermediate.crt")) {
            continue;
        }
        let Some(der) = first_der(body) else { continue };
        let Ok((_, c)) = x509_parser::parse_x509_certificate(&der) else {
            continue;
        };
        if !c.validity().is_valid() || !signed_by(&c, &root) {
            continue;
        }
        let spki = c.public_key().raw;
        if let Some((from, _)) = spkis.iter().find(|(_, s)| s.as_slice() == spki) {
            return Some((name, dir_keys[*from].clone()));
        }
    }
    None
}

fn first_der(pem: &[u8]) -> Option<Vec<u8>> {
    keyproof_identity::keys::certs_from_pem(pem)
        .ok()?
        .into_iter()
        .next()
        .map(|c| c.to_vec())
}

/// Whether `cert` is signed by `issuer`'s key (the key types keyproof
/// makes: ECDSA P-256 with SHA-256, Ed25519).
fn signed_by(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    issuer: &x509_parser::certificate::X509Certificate<'_>,
) -> bool {
    use aws_lc_rs::signature;
    if cert.issuer() != issuer.subject() {
        return false;
    }
    let alg: &'static dyn signature::VerificationAlgorithm =
        match cert.signature_algorithm.algorithm.to_id_string().as_str() {
            "1.2.840.10045.4.3.2" => &signature::ECDSA_P256_SHA256_ASN1,
            "1.3.101.112" => &signature::ED25519,
            _ => return false,
        };
    let pk: &[u8] = &issuer.public_key().subject_public_key.data;
    signature::UnparsedPublicKey::new(alg, pk)
        .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .is_ok()
}

/// The SubjectPublicKeyInfo of the first certificate of a PEM document.
fn cert_spki(pem: &[u8]) -> Option<Vec<u8>> {
    let der = keyproof_identity::keys::certs_from_pem(pem)
        .ok()?
        .into_iter()
        .next()?;
    let (_, c) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(c.public_key().raw.to_vec())
}

/// The SubjectPublicKeyInfo of a PEM key file.
fn key_spki(pem: &[u8]) -> Option<Vec<u8>> {
    let pem = std::str::from_utf8(pem).ok()?;
    let kp = keyproof_identity::keys::key_pair_from_pem(pem).ok()?;
    Some(crate::cakey::CaKey::File(kp).spki())
}

/// A relative path safe to join under a directory: no `..`, not absolute,
/// not empty (names come from the database).
pub(crate) fn check_rel(rel: &str) -> Result<(), StoreError> {
    let p = Path::new(rel);
    let ok = !rel.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Corrupt {
            what: "document name",
            msg: format!("{rel:?} is not a relative path inside the CA directory"),
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Every regular file under `root` (recursively, symbolic links and
/// dot-files such as staged temporaries skipped) whose kind passes `keep`,
/// by relative path. A missing `root` holds nothing.
pub(crate) fn scan(
    root: &Path,
    keep: impl Fn(Kind) -> bool,
) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel_dir) = stack.pop() {
        let dir = if rel_dir.is_empty() {
            root.to_owned()
        } else {
            root.join(&rel_dir)
        };
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && rel_dir.is_empty() => {
                return Ok(out)
            }
            Err(e) => return Err(io(&dir)(e)),
        };
        for ent in rd {
            let ent = ent.map_err(io(&dir))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            let rel = if rel_dir.is_empty() {
                name.to_owned()
            } else {
                format!("{rel_dir}/{name}")
            };
            let ft = ent.file_type().map_err(io(&ent.path()))?;
            if ft.is_dir() {
                stack.push(rel);
            } else if ft.is_file() && keep(kind(&rel)) {
                let path = ent.path();
                out.insert(rel, std::fs::read(&path).map_err(io(&path))?);
            }
        }
    }
    Ok(out)
}

/// Writes `rel` under `root` atomically (keys 0600, others 0644), creating
/// missing parent directories 0700.
pub(crate) fn write(root: &Path, rel: &str, data: &[u8]) -> Result<(), StoreError> {
    check_rel(rel)?;
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        create_dir_private(parent)?;
    }
    let mode = if kind(rel) == Kind::Key {
        SECRET
    } else {
        PUBLIC
    };
    fsutil::write_atomic(&path, data, mode).map_err(io(&path))
}

/// Removes `rel` under `root`, and the directories it leaves empty (up to
/// `root`). A file already gone is fine.
pub(crate) fn remove(root: &Path, rel: &str) -> Result<(), StoreError> {
    check_rel(rel)?;
    let path = root.join(rel);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&path)(e)),
    }
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == root || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

/// Creates `dir` and its missing parents with mode 0700.
pub(crate) fn create_dir_private(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// The name prefix of workspaces made by process `pid`.
pub(crate) fn prefix_for(pid: u32) -> String {
    format!("{WORKSPACE_PREFIX}{pid}-")
}

const WORKSPACE_PREFIX: &str = "keyproof-ca-ws-";

/// Once per process, before its first workspace: removes workspaces in
/// `tmp` left by processes that are gone (killed before they could clean
/// up: the workspaces hold copies of key files). A workspace is stale when
/// no process has its pid, or when its pid is this process's own: in a
/// container the restarted CA often gets the pid of the one before it, and
/// this process has made none yet. Only directories this user owns are
/// touched; errors are ignored (another process may be sweeping too).
pub(crate) fn sweep_stale(tmp: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| sweep(tmp));
}

fn sweep(tmp: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    // Our own uid: the owner of our /proc entry.
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let own_pid = std::process::id();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(WORKSPACE_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(meta) = e.path().symlink_metadata() else {
            continue;
        };
        if !meta.is_dir() || Some(meta.uid()) != me {
            continue;
        }
        let gone = !Path::new(&format!("/proc/{pid}")).exists();
        if gone || pid == own_pid {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(kind("intermediate.key"), Kind::Key);
        assert_eq!(kind("next/root.key"), Kind::Key);
        assert_eq!(kind("archive/1-root.key"), Kind::Key);
        assert_eq!(kind("next/EVIL.Key"), Kind::Key, "any case");
        assert_eq!(kind("ledger.jsonl"), Kind::Ledger);
        assert_eq!(kind("tokens.jsonl"), Kind::Tokens);
        assert_eq!(kind("next/root.crt"), Kind::Document);
        assert!(check_rel("../x").is_err() && check_rel("/x").is_err() && check_rel("").is_err());
        assert!(check_rel("archive/1-root.crt").is_ok());
    }

    #[test]
    fn a_workspace_holds_no_root_key_it_does_not_use() {
        let dir_keys: BTreeMap<String, Vec<u8>> = [
            "root.key",
            "intermediate.key",
            "next/root.key",
            "next/intermediate.key",
            "archive/20260101T000000Z-root.key",
            "archive/20260101T000000Z-intermediate.key",
        ]
        .into_iter()
        .map(|n| (n.to_owned(), b"k".to_vec()))
        .collect();
        let names = |read_only| {
            resolve_keys(&BTreeMap::new(), &dir_keys, read_only)
                .0
                .into_keys()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(true),
            [
                "archive/20260101T000000Z-intermediate.key",
                "intermediate.key",
                "next/intermediate.key"
            ]
        );
        assert_eq!(
            names(false),
            [
                "archive/20260101T000000Z-intermediate.key",
                "intermediate.key",
                "next/intermediate.key",
                "next/root.key",
                "root.key"
            ]
        );
    }

    #[test]
    fn scan_write_remove() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "next/root.key", b"k").unwrap();
        write(d.path(), "ca.json", b"{}").unwrap();
        std::fs::write(d.path().join(".tmp1"), b"x").unwrap();
        let keys = scan(d.path(), |k| k == Kind::Key).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["next/root.key"]);
        let all = scan(d.path(), |_| true).unwrap();
        assert_eq!(all.len(), 2);
        remove(d.path(), "next/root.key").unwrap();
        assert!(!d.path().join("next").exists());
        assert!(scan(&d.path().join("none"), |_| true).unwrap().is_empty());
    }

    #[test]
    fn workspaces_of_gone_processes_are_swept_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        // No process has pid u32::MAX - 1 (pid_max is at most 2^22).
        let gone = tmp.path().join(format!("{}abc", prefix_for(u32::MAX - 1)));
        let live = tmp.path().join(format!("{}abc", prefix_for(1)));
        let other = tmp.path().join("keyproof-ca-wsx");
        for d in [&gone, &live, &other] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("intermediate.key"), "k").unwrap();
        }
        sweep(tmp.path());
        assert!(!gone.exists(), "a dead process's workspace is removed");
        assert!(live.exists(), "pid 1 is alive: its workspace stays");
        assert!(other.exists(), "not a workspace name: left alone");
    }
}
