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

use std::fs;
use std::path::Path;
use std::time::Duration;

use keyproof_identity::keys;
use time::OffsetDateTime;

use crate::bundle;
use crate::ca::{
    self, check_ca_lifetimes, files, first_cert, io_err, new_intermediate, new_root, write_pair,
    write_state, Ca, CaError, Lifetime, NewCa, RotationStage,
};
use crate::ledger;

fn archive(dir: &Path, name: &str) -> Result<(), CaError> {
    let src = dir.join(name);
    if !src.exists() {
        return Ok(());
    }
    let adir = dir.join(files::ARCHIVE);
    fs::create_dir_all(&adir).map_err(io_err(&adir))?;
    let dst = adir.join(format!("{}-{name}", ca::now().unix_timestamp_nanos()));
    fs::copy(&src, &dst).map_err(io_err(&dst))?;
    Ok(())
}

fn load_pair(dir: &Path, stem: &str) -> Result<NewCa, CaError> {
    let cert = first_cert(&dir.join(format!("{stem}.crt")))?;
    let key_path = dir.join(format!("{stem}.key"));
    let pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
    let key = keys::key_pair_from_pem(&pem).map_err(|e| CaError::Corrupt {
        path: key_path,
        msg: e.to_string(),
    })?;
    Ok(NewCa { cert, key })
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

/// A new intermediate under the current root; issuance uses it at once.
pub fn intermediate(dir: &Path, ttl: Duration) -> Result<String, CaError> {
    Lifetime::Intermediate.check(ttl)?;
    let ca = Ca::open(dir)?;
    let root = load_pair(dir, "root")?;
    let int = new_intermediate(ca.trust_domain(), ca.key_type(), ttl, &root)?;
    archive(dir, files::INT_CRT)?;
    archive(dir, files::INT_KEY)?;
    write_pair(dir, "intermediate", &int)?;
    Ok(format!(
        "new intermediate {} valid until {}; the bundle is unchanged",
        keys::fingerprint(&int.cert),
        ca::rfc3339(ca::not_after_of(&int.cert)?)
    ))
}

/// Step 1: a new root and intermediate join the bundle.
pub fn prepare(dir: &Path, root_ttl: Duration, int_ttl: Duration) -> Result<String, CaError> {
    check_ca_lifetimes(root_ttl, int_ttl)?;
    let ca = Ca::open(dir)?;
    require(&ca, RotationStage::Idle, "prepare")?;
    let root = new_root(ca.trust_domain(), ca.key_type(), root_ttl)?;
    let int = new_intermediate(ca.trust_domain(), ca.key_type(), int_ttl, &root)?;
    let next = dir.join(files::NEXT);
    fs::create_dir_all(&next).map_err(io_err(&next))?;
    write_pair(&next, "root", &root)?;
    write_pair(&next, "intermediate", &int)?;
    let mut state = ca.state().clone();
    state.spiffe_sequence += 1;
    state.rotation = RotationStage::Prepared;
    let mut roots = ca.bundle().to_vec();
    roots.push(root.cert.clone());
    bundle::write(dir, state.bundle_meta(), &roots)?;
    write_state(dir, &state)?;
    Ok(format!(
        "prepared: the bundle now holds {} roots (spiffe_sequence {}); issuance stays on the old chain.\n\
         Next: wait until every proxy has the new bundle ([identity.ca] sidecars: keyproof_trust_bundle_sequence reaching {}; \
         [identity.files] proxies: keyproof_identity_reloads_total; either: /identity), then `rotate root activate`.",
        roots.len(),
        state.spiffe_sequence,
        state.spiffe_sequence
    ))
}

/// Step 2: issuance moves to the prepared chain.
pub fn activate(dir: &Path) -> Result<String, CaError> {
    let ca = Ca::open(dir)?;
    require(&ca, RotationStage::Prepared, "activate")?;
    let next = dir.join(files::NEXT);
    let new = load_pair(&next, "root")?;
    load_pair(&next, "intermediate")?;
    let prev = dir.join(files::PREVIOUS_ROOT);
    fs::copy(dir.join(files::ROOT_CRT), &prev).map_err(io_err(&prev))?;
    for f in [
        files::ROOT_CRT,
        files::ROOT_KEY,
        files::INT_CRT,
        files::INT_KEY,
    ] {
        archive(dir, f)?;
    }
    for f in [
        files::ROOT_KEY,
        files::ROOT_CRT,
        files::INT_KEY,
        files::INT_CRT,
    ] {
        let src = next.join(f);
        fs::rename(&src, dir.join(f)).map_err(io_err(&src))?;
    }
    fs::remove_dir(&next).map_err(io_err(&next))?;
    let mut state = ca.state().clone();
    state.rotation = RotationStage::Activated;
    write_state(dir, &state)?;
    Ok(format!(
        "activated: new certificates chain to root {}.\n\
         Next: once every certificate from the old root has been renewed or has expired, `rotate root finish`.",
        keys::fingerprint(&new.cert)
    ))
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
    let ca = Ca::open(dir)?;
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
    let prev = first_cert(&dir.join(files::PREVIOUS_ROOT))?;
    let roots: Vec<_> = ca
        .bundle()
        .iter()
        .filter(|r| **r != prev)
        .cloned()
        .collect();
    let mut state = ca.state().clone();
    state.spiffe_sequence += 1;
    state.rotation = RotationStage::Idle;
    bundle::write(dir, state.bundle_meta(), &roots)?;
    write_state(dir, &state)?;
    archive(dir, files::PREVIOUS_ROOT)?;
    let prev_path = dir.join(files::PREVIOUS_ROOT);
    fs::remove_file(&prev_path).map_err(io_err(&prev_path))?;
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
