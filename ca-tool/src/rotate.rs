//! CA rotation without downtime.
//!
//! An intermediate can be replaced at any time: the bundle (the roots) does
//! not change, and leaves carry their intermediate. A root moves in three
//! steps so that every relying party trusts the new root before anything is
//! issued from it, and the old root leaves the bundle only once nothing
//! unexpired depends on it (the Linkerd trust-anchor outage pattern):
//!
//! 1. `prepare`: new root + intermediate in `next/`; bundle = old + new.
//! 2. `activate`: issuance moves to the new chain; bundle unchanged.
//! 3. `finish`: bundle = new root only; refused while the ledger holds
//!    unexpired certificates from the old root (unless forced).
//!
//! Keys (see [`crate::cakey`]): a new key is made where the one it replaces
//! lives: in the directory, or in the same token under a new label. An
//! offline root's successor goes to the file `prepare` is given
//! (`--root-key-out`), and `rotate intermediate` takes an offline root from
//! `--root-key`. Only `rotate intermediate` needs the current root key;
//! `prepare` needs none of the current keys (the new root signs the new
//! intermediate), `activate` checks the prepared intermediate key signs,
//! `finish` needs no key. Retired keys in a token stay there, named in a
//! note in `archive/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyproof_identity::keys;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::bundle;
use crate::ca::{
    self, check_ca_lifetimes, check_offline_key_path, files, first_cert, io_err, left_in_token,
    new_intermediate, new_root, open_key, pair_files, state_json, write_offline_key, Ca, CaError,
    Lifetime, NewCa, RotationStage,
};
use crate::cakey::{KeyAccess, KeyHome, KeyLocation};
use crate::fsutil::{self, PUBLIC, SECRET};
use crate::journal::Change;
use crate::ledger;

/// [`fsutil::private_dir`], its error a [`CaError`].
fn private_dir(path: &Path) -> Result<(), CaError> {
    fsutil::private_dir(path).map_err(io_err(path))
}

/// A name in `archive/` for `name` that nothing has taken, relative to the
/// CA directory: prefixed with the time in nanoseconds (not [`ca::now`],
/// which is whole seconds: two steps in the same second must not overwrite
/// each other's archive).
fn archive_path(dir: &Path, name: &str) -> Result<PathBuf, CaError> {
    let adir = dir.join(files::ARCHIVE);
    private_dir(&adir)?;
    let mut t = OffsetDateTime::now_utc().unix_timestamp_nanos();
    loop {
        let rel = Path::new(files::ARCHIVE).join(format!("{t}-{name}"));
        if fs::symlink_metadata(dir.join(&rel)).is_err() {
            return Ok(rel);
        }
        t += 1;
    }
}

/// Adds to `change` a copy of the file `name` into `archive/`, if it is there.
fn archive(change: &mut Change, dir: &Path, name: &str) -> Result<(), CaError> {
    let src = dir.join(name);
    let data = match fs::read(&src) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(&src)(e)),
    };
    let mode = if name.ends_with(".key") {
        SECRET
    } else {
        PUBLIC
    };
    change.put(archive_path(dir, name)?, data, mode);
    Ok(())
}

/// Archives a key that stops being used: a file in the directory is copied
/// to `archive/` as before; a key kept elsewhere (a token, an offline file)
/// is left where it is, and a note in `archive/` says where, so that the
/// operator can destroy it once nothing needs it. keyproof never deletes
/// token objects.
fn archive_key(
    change: &mut Change,
    dir: &Path,
    stem: &str,
    loc: &KeyLocation,
) -> Result<(), CaError> {
    let note = match loc {
        KeyLocation::File => return archive(change, dir, &format!("{stem}.key")),
        KeyLocation::Pkcs11(t) => format!(
            "left in the token; once nothing needs it, delete it, e.g. `pkcs11-tool --module {} \
             --token-label {} --login --delete-object --type privkey --label {}` (and the \
             public key: --type pubkey)",
            t.module.display(),
            t.token_label,
            t.label
        ),
        KeyLocation::Offline(o) => format!(
            "an offline file (written to {}); destroy it once nothing needs it",
            o.written_to.display()
        ),
    };
    let path = archive_path(dir, &format!("{stem}.key.{}.json", loc.kind()))?;
    let body = serde_json::json!({
        "key": stem,
        "location": loc,
        "retired_at": ca::rfc3339(ca::now()),
        "note": note,
    });
    let mut text = serde_json::to_vec_pretty(&body).unwrap_or_default();
    text.push(b'\n');
    change.put(path, text, PUBLIC);
    Ok(())
}

/// Adds a new CA certificate (and its key, when a file) to `change`, in
/// `rel_dir` (relative to the CA directory).
fn put_pair(change: &mut Change, rel_dir: &Path, stem: &str, ca: &NewCa) {
    for (name, data, mode) in pair_files(stem, ca) {
        change.put(rel_dir.join(name), data, mode);
    }
}

/// Adds the bundle for `roots` to `change`.
fn put_bundle(change: &mut Change, meta: bundle::Meta, roots: &[CertificateDer<'_>]) {
    for (name, data) in bundle::documents(meta, roots) {
        change.put(name, data, PUBLIC);
    }
}

fn require(ca: &Ca, stage: RotationStage, step: &str) -> Result<(), CaError> {
    if ca.state().rotation != stage {
        return Err(CaError::Rotation(
            format!(
                "cannot {step}: the root rotation is {:?}, expected {:?}",
                ca.state().rotation,
                stage
            )
            .to_lowercase(),
        ));
    }
    Ok(())
}

/// Where the next intermediate key goes: beside the current one.
fn intermediate_home(ca: &Ca, access: &KeyAccess) -> Result<KeyHome, CaError> {
    KeyHome::same_as(&ca.state().keys.intermediate, access.intermediate_pin()).ok_or_else(|| {
        CaError::Corrupt {
            path: ca.dir().join(files::STATE),
            msg: "the intermediate key cannot be offline".into(),
        }
    })
}

/// A new intermediate under the current root; issuance uses it at once.
/// The root key comes from where `ca.json` says (the directory or its
/// token) or, for an offline root, from `access.root_key` (`--root-key`).
/// The new key is made where the current one is (the same token).
pub fn intermediate(dir: &Path, ttl: Duration, access: &KeyAccess) -> Result<String, CaError> {
    Lifetime::Intermediate.check(ttl)?;
    // The current intermediate key is not needed (it may be the reason for
    // the rotation): only where it lives.
    let ca = Ca::open_public(dir)?;
    let root_key = ca.root_key(access)?;
    let home = intermediate_home(&ca, access)?;
    let int = new_intermediate(
        ca.trust_domain(),
        ca.key_type(),
        ttl,
        ca.root(),
        &root_key,
        &home,
    )?;
    let old = ca.state().keys.intermediate.clone();
    let install = || -> Result<(), CaError> {
        // The old pair and the new one, all or nothing (journal.rs): a
        // run killed between the new key and its certificate must not leave
        // a directory that neither serves nor issues.
        let mut change = Change::new(dir);
        archive(&mut change, dir, files::INT_CRT)?;
        archive_key(&mut change, dir, "intermediate", &old)?;
        put_pair(&mut change, Path::new(""), "intermediate", &int);
        if int.location != old {
            let mut state = ca.state().clone();
            state.keys.intermediate = int.location.clone();
            change.put(files::STATE, state_json(dir, &state)?, PUBLIC);
        }
        change.commit()
    };
    install().map_err(|e| left_in_token(e, &[&int.location]))?;
    Ok(format!(
        "new intermediate {} valid until {} (key: {}); the bundle is unchanged",
        keys::fingerprint(&int.cert),
        ca::rfc3339(ca::not_after_of(&int.cert)?),
        int.location.describe("intermediate"),
    ))
}

/// Step 1: a new root and intermediate join the bundle. The new keys are
/// made where the current ones are (the same tokens, or the directory); a
/// new offline root key is written to `root_key_out` (`--root-key-out`),
/// which an offline root requires and a root in a token refuses. A root in
/// the directory moves offline when `root_key_out` is given.
pub fn prepare(
    dir: &Path,
    root_ttl: Duration,
    int_ttl: Duration,
    access: &KeyAccess,
    root_key_out: Option<&Path>,
) -> Result<String, CaError> {
    check_ca_lifetimes(root_ttl, int_ttl)?;
    let ca = Ca::open_public(dir)?;
    require(&ca, RotationStage::Idle, "prepare")?;
    let locs = &ca.state().keys;
    let root_home = match (&locs.root, root_key_out) {
        (KeyLocation::Pkcs11(r), Some(_)) => {
            return Err(CaError::KeyAccess(format!(
                "--root-key-out: the root key is in a PKCS#11 token ({}); the new root key is \
                 generated in the same token",
                r.uri()
            )))
        }
        (_, Some(path)) => {
            check_offline_key_path(dir, "root-key-out", path)?;
            KeyHome::Offline(path.to_owned())
        }
        (KeyLocation::Offline(o), None) => {
            return Err(CaError::RootKeyOffline(format!(
                "the root key is offline (written to {}): pass --root-key-out FILE for the new \
                 root's key, outside the CA directory",
                o.written_to.display()
            )))
        }
        (KeyLocation::File, None) => KeyHome::Dir,
        (KeyLocation::Pkcs11(r), None) => {
            KeyHome::Token(r.spec(access.root_pin(r, &locs.intermediate)))
        }
    };
    let int_home = intermediate_home(&ca, access)?;
    let root = new_root(ca.trust_domain(), ca.key_type(), root_ttl, &root_home)?;
    let int = new_intermediate(
        ca.trust_domain(),
        ca.key_type(),
        int_ttl,
        &root.cert,
        &root.key,
        &int_home,
    )
    .map_err(|e| left_in_token(e, &[&root.location]))?;
    let mut state = ca.state().clone();
    state.spiffe_sequence += 1;
    state.rotation = RotationStage::Prepared;
    state.keys.next_root = root.location.clone();
    state.keys.next_intermediate = int.location.clone();
    // Idle, the bundle is the CA's one root: built from it, not from
    // bundle.pem, which a prepare killed before it wrote ca.json left
    // holding a root of its own that nothing else would ever take out.
    let roots = vec![ca.root().clone(), root.cert.clone()];
    let install = || -> Result<(), CaError> {
        if let KeyHome::Offline(path) = &root_home {
            write_offline_key("root-key-out", path, &root.key)?;
        }
        // All or nothing (journal.rs): a bundle with the new root beside a
        // `ca.json` that knows nothing of it would be served to every
        // workload.
        let mut change = Change::new(dir);
        let next = Path::new(files::NEXT);
        put_pair(&mut change, next, "root", &root);
        put_pair(&mut change, next, "intermediate", &int);
        put_bundle(&mut change, state.bundle_meta(), &roots);
        change.put(files::STATE, state_json(dir, &state)?, PUBLIC);
        change.commit()
    };
    install().map_err(|e| left_in_token(e, &[&root.location, &int.location]))?;
    Ok(format!(
        "prepared: the bundle now holds {} roots (spiffe_sequence {}); issuance stays on the old chain.\n\
         New root key: {}; new intermediate key: {}.\n\
         Next: wait until every proxy has the new bundle ([identity.ca] sidecars: keyproof_trust_bundle_sequence reaching {}; \
         [identity.files] proxies: keyproof_identity_reloads_total; either: /identity), then `rotate root activate`.",
        roots.len(),
        state.spiffe_sequence,
        root.location.describe("root"),
        int.location.describe("intermediate"),
        state.spiffe_sequence
    ))
}

/// Step 2: issuance moves to the prepared chain. The prepared intermediate
/// key must open, match its certificate and sign, or nothing changes.
pub fn activate(dir: &Path, access: &KeyAccess) -> Result<String, CaError> {
    let ca = Ca::open_public(dir)?;
    require(&ca, RotationStage::Prepared, "activate")?;
    let next = dir.join(files::NEXT);
    let locs = ca.state().keys.clone();
    // A run killed part way (its renames are separate steps, and `ca.json`
    // is written last) is finished by running it again: each prepared
    // file is in `next/` until moved, and in the directory after, so the
    // new material is wherever it is now, and moves that happened are not
    // made again.
    let moved = |f: &str| !next.join(f).exists();
    let new_home = |f: &str| {
        if moved(f) {
            dir.to_owned()
        } else {
            next.clone()
        }
    };
    let int_key = match &locs.next_intermediate {
        KeyLocation::File => {
            let key_path = new_home(files::INT_KEY).join(files::INT_KEY);
            let cert_path = new_home(files::INT_CRT).join(files::INT_CRT);
            let key = ca::read_key_file(&key_path)?;
            ca::check_key_matches(
                "prepared intermediate key",
                key_path.display().to_string(),
                &key,
                &first_cert(&cert_path)?,
                &cert_path,
            )?;
            key
        }
        other => open_key(
            &new_home(files::INT_CRT),
            "intermediate",
            "prepared intermediate key",
            other,
            access.intermediate_pin(),
        )?,
    };
    if let Err(e) = int_key.probe() {
        return Err(CaError::Rotation(format!(
            "cannot activate: the prepared intermediate key ({}) does not sign: {e}",
            locs.next_intermediate.describe("intermediate")
        )));
    }
    // The new root key is not needed to issue; a file one must be there to
    // be moved into place.
    if locs.next_root.is_file() {
        let key_path = new_home(files::ROOT_KEY).join(files::ROOT_KEY);
        let cert_path = new_home(files::ROOT_CRT).join(files::ROOT_CRT);
        ca::check_key_matches(
            "prepared root key",
            key_path.display().to_string(),
            &ca::read_key_file(&key_path)?,
            &first_cert(&cert_path)?,
            &cert_path,
        )?;
    }
    let new = first_cert(&new_home(files::ROOT_CRT).join(files::ROOT_CRT))?;
    // All or nothing (journal.rs), and what is left in `next/` by a run
    // of an older version killed part way is taken from there.
    let mut change = Change::new(dir);
    if !moved(files::ROOT_CRT) {
        // Only while root.crt is still the outgoing root.
        let prev = dir.join(files::ROOT_CRT);
        let data = fs::read(&prev).map_err(io_err(&prev))?;
        change.put(files::PREVIOUS_ROOT, data, PUBLIC);
        archive(&mut change, dir, files::ROOT_CRT)?;
    }
    if !moved(files::INT_CRT) {
        archive(&mut change, dir, files::INT_CRT)?;
    }
    for (f, stem, old, new_loc) in [
        (files::ROOT_KEY, "root", &locs.root, &locs.next_root),
        (
            files::INT_KEY,
            "intermediate",
            &locs.intermediate,
            &locs.next_intermediate,
        ),
    ] {
        let src = next.join(f);
        if new_loc.is_file() {
            if src.exists() {
                archive_key(&mut change, dir, stem, old)?;
                move_into_place(&mut change, dir, f, SECRET)?;
            }
        } else {
            // The new key lives elsewhere: the old file must not look like
            // the current key.
            archive_key(&mut change, dir, stem, old)?;
            change.remove(f);
        }
    }
    for f in [files::ROOT_CRT, files::INT_CRT] {
        if next.join(f).exists() {
            move_into_place(&mut change, dir, f, PUBLIC)?;
        }
    }
    change.remove_dir(files::NEXT);
    let mut state = ca.state().clone();
    state.rotation = RotationStage::Activated;
    state.keys.root = locs.next_root;
    state.keys.intermediate = locs.next_intermediate;
    state.keys.next_root = KeyLocation::File;
    state.keys.next_intermediate = KeyLocation::File;
    change.put(files::STATE, state_json(dir, &state)?, PUBLIC);
    change.commit()?;
    Ok(format!(
        "activated: new certificates chain to root {}.\n\
         Next: once every certificate from the old root has been renewed or has expired, `rotate root finish`.",
        keys::fingerprint(&new)
    ))
}

/// Adds to `change` the move of `next/<name>` to `<name>`.
fn move_into_place(change: &mut Change, dir: &Path, name: &str, mode: u32) -> Result<(), CaError> {
    let src = dir.join(files::NEXT).join(name);
    let data = fs::read(&src).map_err(io_err(&src))?;
    change.put(name, data, mode);
    change.remove(Path::new(files::NEXT).join(name));
    Ok(())
}

/// Ledger entries still valid that chain to the outgoing root.
fn blocking(dir: &Path) -> Result<Vec<ledger::Entry>, CaError> {
    let prev = first_cert(&dir.join(files::PREVIOUS_ROOT))?;
    let prev_fp = keys::fingerprint(&prev);
    let now = ca::now();
    Ok(ledger::read_all(dir)?
        .into_iter()
        .filter(|e| e.root_sha256 == prev_fp)
        .filter(|e| {
            OffsetDateTime::parse(&e.not_after, &time::format_description::well_known::Rfc3339)
                .map(|na| na > now)
                .unwrap_or(true)
        })
        .collect())
}

/// Step 3: the old root leaves the bundle.
pub fn finish(dir: &Path, force: bool) -> Result<String, CaError> {
    // No key is needed to take a root out of the bundle.
    let ca = Ca::open_public(dir)?;
    require(&ca, RotationStage::Activated, "finish")?;
    let still = blocking(dir)?;
    if !still.is_empty() && !force {
        let mut msg = format!(
            "refusing to finish: {} unexpired certificate(s) still chain only to the old root; \
             they would fail once it leaves the bundle:\n",
            still.len()
        );
        for e in &still {
            msg.push_str(&format!(
                "  {} serial {} expires {}\n",
                e.spiffe_id, e.serial, e.not_after
            ));
        }
        msg.push_str("renew them (or wait for them to expire), or pass --force");
        return Err(CaError::Rotation(msg));
    }
    // The new root alone: built from root.crt rather than by taking the
    // outgoing one out of bundle.pem, which an interrupted prepare may have
    // left holding another.
    let roots = vec![ca.root().clone()];
    let mut state = ca.state().clone();
    state.spiffe_sequence += 1;
    state.rotation = RotationStage::Idle;
    let mut change = Change::new(dir);
    put_bundle(&mut change, state.bundle_meta(), &roots);
    change.put(files::STATE, state_json(dir, &state)?, PUBLIC);
    archive(&mut change, dir, files::PREVIOUS_ROOT)?;
    change.remove(files::PREVIOUS_ROOT);
    change.commit()?;
    Ok(format!(
        "finished: the bundle holds {} root(s) (spiffe_sequence {}){}",
        roots.len(),
        state.spiffe_sequence,
        if still.is_empty() {
            String::new()
        } else {
            format!("; forced past {} certificate(s)", still.len())
        }
    ))
}

/// What `check` says about the rotation stage and what blocks the next step
/// (informational lines: a rotation in progress is not a fault).
pub fn stage_report(ca: &Ca) -> Result<String, CaError> {
    Ok(match ca.state().rotation {
        RotationStage::Idle => format!("idle, {} root(s) in the bundle", ca.bundle().len()),
        RotationStage::Prepared => "prepared: the new root is in the bundle; next `rotate root activate` once every proxy has the new bundle".into(),
        RotationStage::Activated => {
            let still = blocking(ca.dir())?;
            if still.is_empty() {
                "activated: nothing blocks `rotate root finish`".into()
            } else {
                let last = still.iter().map(|e| e.not_after.as_str()).max().unwrap_or_default();
                format!(
                    "activated: `rotate root finish` is blocked by {} unexpired certificate(s) from the old root, the last expiring {last}",
                    still.len()
                )
            }
        }
    })
}
