//! Which model id a request means (audit F10): a full id as it is, a name
//! to a pinned id or the id most distinct workers serve, never by sort
//! order.

use std::collections::{HashMap, HashSet};

use silk_overlay::PeerId;

use super::DispatchError;

/// The name part of a model id (`name@sha256:…` → `name`).
pub fn model_name(id: &str) -> &str {
    id.split('@').next().unwrap_or(id)
}

/// The ids a gateway trusts a model name to mean without asking: the
/// known models (the default one), each pinned by the hash of its file.
pub fn default_pinned_models() -> Vec<String> {
    silk_inference::store::KNOWN_MODELS
        .iter()
        .map(|m| format!("{}@sha256:{}", m.name, m.sha256))
        .collect()
}

/// Resolves the model a request names to one id (audit F10), given the
/// `(id, worker)` pairs the mesh announces and the operator's `pinned`
/// ids. A full id (`name@sha256:…`) is taken as it is. A name (or none, or
/// `default`, meaning the first pinned id) resolves to a pinned id with
/// that name when any worker serves one, else to the id served by the most
/// distinct workers; a tie is refused with the ids to choose from. Never
/// by sort order: anyone can announce `name@sha256:0…`.
pub fn pick_model(
    wanted: Option<&str>,
    served: &[(&str, PeerId)],
    pinned: &[String],
) -> Result<String, DispatchError> {
    let wanted = wanted.filter(|w| !w.is_empty() && *w != "default");
    if let Some(w) = wanted.filter(|w| w.contains("@sha256:")) {
        // Gossip may not know it yet; the DHT can still have providers.
        return Ok(w.to_string());
    }
    let mut workers: HashMap<&str, HashSet<PeerId>> = HashMap::new();
    for (id, peer) in served {
        workers.entry(id).or_default().insert(*peer);
    }
    let matching: Vec<(&str, usize)> = workers
        .iter()
        .filter(|(id, _)| match wanted {
            Some(w) => model_matches(id, w),
            None => true,
        })
        .map(|(id, w)| (*id, w.len()))
        .collect();
    let pinned_hit = pinned.iter().find(|p| {
        matching.iter().any(|(id, _)| id == p) && wanted.is_none_or(|w| model_matches(p, w))
    });
    if let Some(p) = pinned_hit {
        return Ok(p.clone());
    }
    let most = matching.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let mut best: Vec<&str> = matching
        .iter()
        .filter(|(_, n)| *n == most)
        .map(|(id, _)| *id)
        .collect();
    best.sort_unstable();
    match (best.as_slice(), wanted) {
        ([only], _) => Ok((*only).to_string()),
        ([], Some(w)) => Err(DispatchError::UnknownModel(w.to_string())),
        ([], None) => Err(DispatchError::ModelRequired("no model yet".into())),
        (many, _) => Err(DispatchError::ModelRequired(many.join(", "))),
    }
}

fn model_matches(id: &str, wanted: &str) -> bool {
    let wanted = wanted.trim_end_matches(".gguf");
    id == wanted || model_name(id).eq_ignore_ascii_case(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::test_peer as peer;

    /// Audit F10: ids were sorted and the first whose name matched won, so
    /// anyone announcing `name@sha256:0…` took every request by name, and a
    /// second announced id broke every request naming no model.
    #[test]
    fn a_model_name_resolves_to_the_pinned_id_then_to_the_most_served_one() {
        let real = default_pinned_models()[0].clone();
        let fake = format!(
            "{}@sha256:{}",
            silk_inference::DEFAULT_MODEL,
            "0".repeat(64)
        );
        let other = "Other-1B@sha256:aa".to_string();
        let pinned = default_pinned_models();
        // One honest worker; three Sybils serve the fake copy.
        let served: Vec<(&str, PeerId)> = vec![
            (real.as_str(), peer(1)),
            (fake.as_str(), peer(2)),
            (fake.as_str(), peer(3)),
            (fake.as_str(), peer(4)),
            (other.as_str(), peer(5)),
        ];
        let name = silk_inference::DEFAULT_MODEL;
        assert_eq!(
            pick_model(Some(name), &served, &pinned).expect("name"),
            real
        );
        assert_eq!(
            pick_model(Some(&name.to_lowercase()), &served, &pinned).expect("name"),
            real
        );
        // No model, or "default": the pinned model, whatever else is served.
        assert_eq!(pick_model(None, &served, &pinned).expect("none"), real);
        assert_eq!(
            pick_model(Some("default"), &served, &pinned).expect("default"),
            real
        );
        // A full id is taken as it is; another name resolves to its own id.
        assert_eq!(pick_model(Some(&fake), &served, &pinned).expect("id"), fake);
        assert_eq!(
            pick_model(Some("other-1b"), &served, &pinned).expect("other"),
            other
        );
        // Nothing pinned served: the id with the most distinct workers, not
        // the first in sort order; a tie is refused.
        let unpinned: Vec<(&str, PeerId)> = vec![
            ("M@sha256:00", peer(1)),
            ("M@sha256:ff", peer(2)),
            ("M@sha256:ff", peer(3)),
            ("M@sha256:ff", peer(3)),
        ];
        assert_eq!(
            pick_model(Some("M"), &unpinned, &pinned).expect("most"),
            "M@sha256:ff"
        );
        let tie: Vec<(&str, PeerId)> = vec![("M@sha256:00", peer(1)), ("M@sha256:ff", peer(2))];
        assert!(matches!(
            pick_model(Some("M"), &tie, &pinned),
            Err(DispatchError::ModelRequired(_))
        ));
        assert!(matches!(
            pick_model(Some("nope"), &served, &pinned),
            Err(DispatchError::UnknownModel(_))
        ));
    }
}
