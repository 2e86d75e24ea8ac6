//! A query's names, checked before its first page is read: every sweep its filter names by
//! `=`/`in` must be one the caller may see, and every binding key its filter or sort names
//! must be a key of some cell in the sweeps in question. Otherwise it is an
//! [`Error::Invalid`] that lists what exists (`query::names` words it) instead of an empty
//! table. The store answers what exists (`store/known.rs`); this module only decides.

use kiln_proto::SweepId;

use super::Queue;
use crate::query::{self, MAX_LISTED, Pos, SweepRefs, Value};
use crate::store::{CellQuery, KeyScope};
use crate::{Error, Result};

impl Queue {
    /// Refuses `q` when it names a sweep that does not exist or a binding key that no cell of
    /// its sweeps has. `located`: the filter's binding keys and where they are written
    /// ([`crate::query::Filter::parse_located`]). Run it for a query's first page: later pages
    /// repeat the same query.
    ///
    /// A key is not refused while cells of its sweeps still wait in the intake: they are not
    /// queryable yet and may have it.
    pub async fn check_names(&self, q: &CellQuery, located: &[(String, Pos)]) -> Result<()> {
        let owner = q.owner.as_deref();
        let named = q.filter.as_ref().map(query::sweep_refs).unwrap_or_default();
        let found = if named.is_empty() {
            Vec::new()
        } else {
            self.store
                .sweeps_named(&named.names, &named.ids, owner)
                .await?
        };
        if let Some(missing) = first_missing(&named, &found) {
            let newest: Vec<(i64, String)> = self
                .store
                .sweeps_newest(owner, MAX_LISTED + 1)
                .await?
                .into_iter()
                .map(|(id, name)| (id.0, name))
                .collect();
            return Err(Error::invalid(query::unknown_sweep(&missing, &newest)));
        }
        let keys = query::key_refs(located, &q.sorts);
        if keys.is_empty() {
            return Ok(());
        }
        let (scope, label) = scope(q, &found);
        for r in &keys {
            if self.store.binding_key_exists(&scope, &r.key).await? {
                continue;
            }
            if self.store.intake_pending_in(&scope).await? {
                return Ok(());
            }
            let mut known = self.store.binding_keys(&scope, MAX_LISTED + 1).await?;
            let more = known.len() > MAX_LISTED;
            known.truncate(MAX_LISTED);
            return Err(Error::invalid(query::unknown_binding(
                r,
                label.as_deref(),
                &known,
                more,
            )));
        }
        Ok(())
    }
}

/// The first sweep `named` names that is not among `found`: a name, then an id.
fn first_missing(named: &SweepRefs, found: &[(SweepId, String)]) -> Option<Value> {
    let name = named
        .names
        .iter()
        .find(|n| !found.iter().any(|(_, f)| f == *n))
        .map(|n| Value::Text(n.clone()));
    name.or_else(|| {
        named
            .ids
            .iter()
            .find(|i| !found.iter().any(|(id, _)| id.0 == **i))
            .map(|i| Value::Int(*i))
    })
}

/// The cells `q`'s binding keys are looked for in, and how a message names them (`None`:
/// every sweep the caller may see). `found`: the sweeps the filter names, all of which exist.
fn scope(q: &CellQuery, found: &[(SweepId, String)]) -> (KeyScope, Option<String>) {
    let owner = q.owner.clone();
    if let Some(id) = q.sweep {
        let scope = KeyScope {
            sweeps: Some(vec![id]),
            owner,
        };
        return (scope, Some(format!("sweep {}", id.0)));
    }
    match q.filter.as_ref().and_then(query::sweep_scope) {
        Some(refs) => {
            let ids = found
                .iter()
                .filter(|(id, name)| refs.ids.contains(&id.0) || refs.names.contains(name))
                .map(|(id, _)| *id)
                .collect();
            let scope = KeyScope {
                sweeps: Some(ids),
                owner,
            };
            (scope, Some(refs.describe()))
        }
        None => (
            KeyScope {
                sweeps: None,
                owner,
            },
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::Filter;

    fn sweeps() -> Vec<(SweepId, String)> {
        vec![
            (SweepId(1), "foxes".into()),
            (SweepId(2), "owls".into()),
            (SweepId(3), "foxes".into()),
        ]
    }

    #[test]
    fn a_missing_name_comes_before_a_missing_id() {
        let named = SweepRefs {
            names: vec!["foxes".into(), "fxoes".into()],
            ids: vec![9],
        };
        assert_eq!(
            first_missing(&named, &sweeps()),
            Some(Value::Text("fxoes".into()))
        );
        let named = SweepRefs {
            names: vec!["owls".into()],
            ids: vec![2, 9],
        };
        assert_eq!(first_missing(&named, &sweeps()), Some(Value::Int(9)));
        assert_eq!(first_missing(&SweepRefs::default(), &[]), None);
    }

    #[test]
    fn the_scope_is_the_sweeps_every_match_is_in() {
        let q = |f: &str| CellQuery {
            filter: Some(Filter::parse(f).unwrap()),
            owner: Some("me".into()),
            ..Default::default()
        };
        let (s, label) = scope(&q(r#"sweep = "foxes" and animal = "fox""#), &sweeps());
        assert_eq!(s.sweeps, Some(vec![SweepId(1), SweepId(3)]));
        assert_eq!(s.owner.as_deref(), Some("me"));
        assert_eq!(label.as_deref(), Some("sweep \"foxes\""));
        let (s, label) = scope(&q(r#"sweep = 2 or animal = "fox""#), &sweeps());
        assert_eq!((s.sweeps, label), (None, None));
        let mut by_field = q(r#"animal = "fox""#);
        by_field.sweep = Some(SweepId(2));
        let (s, label) = scope(&by_field, &[]);
        assert_eq!(s.sweeps, Some(vec![SweepId(2)]));
        assert_eq!(label.as_deref(), Some("sweep 2"));
    }
}
