//! What a filter names that must exist for it to mean something: the sweeps it tests by name or
//! id, the binding keys it (or `--sort`) tests, and the messages for a name that nothing has —
//! listing what does exist, so a typo is an error rather than an empty table. Pure: the store
//! says what exists (`store/known.rs`), the queue puts the two together (`queue/names.rs`).

use super::ast::{CmpOp, Column, Field, Filter, Pos, Predicate, Test, Value};
use super::sort::SortKey;

/// Most binding keys (and sweeps) an error lists.
pub const MAX_LISTED: usize = 50;

/// Sweeps named by equality: `sweep = "foxes"`, `sweep = 3`, `sweep in ("a", 4)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepRefs {
    /// Names, each once, in text order.
    pub names: Vec<String>,
    /// Ids, each once, in text order.
    pub ids: Vec<i64>,
}

impl SweepRefs {
    /// Whether it names no sweep.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.ids.is_empty()
    }

    fn add(&mut self, test: &Test) -> bool {
        let values: &[Value] = match test {
            Test::Cmp(CmpOp::Eq, v) => std::slice::from_ref(v),
            Test::In(vs) => vs,
            _ => return false,
        };
        for v in values {
            match v {
                Value::Text(n) if !self.names.contains(n) => self.names.push(n.clone()),
                Value::Int(i) if !self.ids.contains(i) => self.ids.push(*i),
                _ => {}
            }
        }
        true
    }

    /// How a message names these sweeps: `sweep "foxes"`, `sweeps 1, "owls"`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .ids
            .iter()
            .map(i64::to_string)
            .chain(self.names.iter().map(|n| format!("{n:?}")))
            .collect();
        let noun = if parts.len() == 1 { "sweep" } else { "sweeps" };
        format!("{noun} {}", parts.join(", "))
    }
}

/// Every sweep `f` tests by equality, wherever the test is (under `not` and `or` too): each
/// must exist, or the filter has a typo.
pub fn sweep_refs(f: &Filter) -> SweepRefs {
    fn walk(f: &Filter, out: &mut SweepRefs) {
        match f {
            Filter::And(parts) | Filter::Or(parts) => parts.iter().for_each(|p| walk(p, out)),
            Filter::Not(inner) => walk(inner, out),
            Filter::Pred(Predicate {
                field: Field::Column(Column::Sweep),
                test,
            }) => {
                out.add(test);
            }
            Filter::Pred(_) => {}
        }
    }
    let mut out = SweepRefs::default();
    walk(f, &mut out);
    out
}

/// The sweeps every cell `f` matches belongs to, when a top-level `and` part of `f` says so
/// (`sweep = "foxes" and …`, `sweep in (1, 2) and …`); `None` when `f` may match any sweep.
/// The first such part is taken: every match is in it, which is all that is needed.
pub fn sweep_scope(f: &Filter) -> Option<SweepRefs> {
    match f {
        Filter::And(parts) => parts.iter().find_map(sweep_scope),
        // `sweep in ("a", 3)` parses as an `or` of a name list and an id list.
        Filter::Or(parts) => {
            let mut out = SweepRefs::default();
            for p in parts {
                let Filter::Pred(Predicate {
                    field: Field::Column(Column::Sweep),
                    test,
                }) = p
                else {
                    return None;
                };
                if !out.add(test) {
                    return None;
                }
            }
            Some(out)
        }
        Filter::Pred(Predicate {
            field: Field::Column(Column::Sweep),
            test,
        }) => {
            let mut out = SweepRefs::default();
            out.add(test).then_some(out)
        }
        Filter::Not(_) | Filter::Pred(_) => None,
    }
}

/// A binding key a query names, and where: in the filter at `Some(pos)`, or in `--sort`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRef {
    /// The key.
    pub key: String,
    /// Where the filter names it; `None` for a sort key.
    pub pos: Option<Pos>,
}

/// The binding keys of a filter (as [`crate::query::Filter::parse_located`] found them) and
/// of sort keys, each once, filter first.
pub fn key_refs(filter: &[(String, Pos)], sorts: &[SortKey]) -> Vec<KeyRef> {
    let mut out: Vec<KeyRef> = Vec::new();
    let sort_keys = sorts.iter().filter_map(|s| match &s.field {
        Field::Binding(k) => Some((k.clone(), None)),
        Field::Column(_) => None,
    });
    let all = filter.iter().map(|(k, p)| (k.clone(), Some(*p)));
    for (key, pos) in all.chain(sort_keys) {
        if !out.iter().any(|r| r.key == key) {
            out.push(KeyRef { key, pos });
        }
    }
    out
}

/// How a key is written in a filter: bare when it can be, else in backticks.
fn written(key: &str) -> String {
    let mut chars = key.chars();
    let bare = chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && Column::from_name(key).is_none()
        && !["and", "or", "not", "between", "in", "binding"]
            .iter()
            .any(|k| key.eq_ignore_ascii_case(k));
    if bare {
        key.to_string()
    } else {
        format!("`{}`", key.replace('`', "``"))
    }
}

/// The message for binding key `r` that no cell in `scope` has (`scope`: as
/// [`SweepRefs::describe`] says, or `None` for every sweep the caller may see). `known`: the
/// binding keys that exist there, sorted, at most [`MAX_LISTED`] of them; `more`: whether
/// there are others.
pub fn unknown_binding(r: &KeyRef, scope: Option<&str>, known: &[String], more: bool) -> String {
    let columns: Vec<&str> = Column::ALL.iter().map(|c| c.name()).collect();
    let candidates = columns
        .iter()
        .copied()
        .chain(known.iter().map(String::as_str));
    let hint = match suggest(&r.key, candidates) {
        Some(s) => format!(" (did you mean {}?)", written(s)),
        None => String::new(),
    };
    let place = match r.pos {
        Some(p) => format!("filter: {p}: "),
        None => "sort: ".to_string(),
    };
    let scope = scope.map_or_else(|| "any sweep".to_string(), str::to_string);
    let bindings = if known.is_empty() {
        format!("no cell of {scope} has bindings")
    } else {
        let list: Vec<String> = known.iter().map(|k| written(k)).collect();
        format!(
            "the bindings of {scope} are {}{}",
            list.join(", "),
            if more { ", …" } else { "" }
        )
    };
    format!(
        "{place}unknown field {}: no column has that name and no cell of {scope} has a \
         binding of that name{hint}; the columns are {}; {bindings} (see docs/query.md)",
        written(&r.key),
        columns.join(", ")
    )
}

/// The message for a sweep the filter names that the caller has none of: `missing` is a
/// name or an id; `sweeps` the newest the caller may see (id, name), at most
/// [`MAX_LISTED`].
pub fn unknown_sweep(missing: &Value, sweeps: &[(i64, String)]) -> String {
    let what = match missing {
        Value::Text(n) => {
            let hint = match suggest(n, sweeps.iter().map(|(_, s)| s.as_str())) {
                Some(s) => format!(" (did you mean {s:?}?)"),
                None => String::new(),
            };
            format!("no sweep is named {n:?}{hint}")
        }
        Value::Int(i) => format!("there is no sweep {i}"),
        Value::Number(n) => format!("there is no sweep {n}"),
    };
    let mut listed: Vec<&(i64, String)> = sweeps.iter().take(MAX_LISTED).collect();
    listed.sort_by_key(|(id, _)| *id);
    let list = if listed.is_empty() {
        "there are no sweeps".to_string()
    } else {
        let items: Vec<String> = listed
            .iter()
            .map(|(id, name)| format!("{id} {name:?}"))
            .collect();
        let newest = if sweeps.len() > MAX_LISTED {
            "the newest sweeps are"
        } else {
            "the sweeps are"
        };
        format!("{newest} {}", items.join(", "))
    };
    format!("filter: {what}; {list} (`kiln sweeps` lists them)")
}

/// The candidate closest to `word`: the same but for case, or at most two edits away (one
/// for words of up to four characters).
fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = if word.chars().count() <= 4 { 1 } else { 2 };
    candidates
        .filter(|c| *c != word)
        .map(|c| {
            let d = if c.to_lowercase() == word.to_lowercase() {
                0
            } else {
                edits(&word.to_lowercase(), &c.to_lowercase())
            };
            (d, c)
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance in characters.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let next = (prev + cost).min(row[j] + 1).min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::parse_sort;

    fn refs(s: &str) -> SweepRefs {
        sweep_refs(&Filter::parse(s).unwrap())
    }

    fn scope(s: &str) -> Option<SweepRefs> {
        sweep_scope(&Filter::parse(s).unwrap())
    }

    fn named(names: &[&str], ids: &[i64]) -> SweepRefs {
        SweepRefs {
            names: names.iter().map(|n| n.to_string()).collect(),
            ids: ids.to_vec(),
        }
    }

    #[test]
    fn sweeps_named_anywhere_and_the_scope() {
        let f = r#"(sweep = "foxes" or not sweep in ("owls", 3)) and sweep ~ "x" and seed = 1"#;
        assert_eq!(refs(f), named(&["foxes", "owls"], &[3]));
        // Not a restriction: `or` with another test, `not`, `~`.
        assert_eq!(scope(f), None);
        assert_eq!(scope(r#"sweep ~ "fox" and seed = 1"#), None);
        assert_eq!(scope(r#"not sweep = 1"#), None);
        assert_eq!(
            scope(r#"seed = 1 and (sweep in ("a", 3) and animal = "fox")"#),
            Some(named(&["a"], &[3]))
        );
        assert_eq!(scope("sweep = 2"), Some(named(&[], &[2])));
        assert_eq!(named(&["a"], &[3]).describe(), "sweeps 3, \"a\"");
        assert_eq!(named(&["a"], &[]).describe(), "sweep \"a\"");
    }

    #[test]
    fn key_refs_come_once_with_their_place() {
        let (_, located) =
            Filter::parse_located(r#"animal = "fox" and `alt1` = "x" or animal != "owl""#).unwrap();
        let sorts = parse_sort("-animal, cfg, binding(\"a b\")").unwrap();
        let got = key_refs(&located, &sorts);
        let keys: Vec<(&str, Option<String>)> = got
            .iter()
            .map(|r| (r.key.as_str(), r.pos.map(|p| p.to_string())))
            .collect();
        assert_eq!(
            keys,
            [
                ("animal", Some("1:1".to_string())),
                ("alt1", Some("1:20".to_string())),
                ("a b", None)
            ]
        );
    }

    #[test]
    fn messages_list_what_exists_and_guess_the_typo() {
        let r = KeyRef {
            key: "animl".into(),
            pos: Some(Pos {
                line: 1,
                column: 22,
            }),
        };
        let known = ["alt1", "animal", "cfg", "my key"].map(String::from);
        let m = unknown_binding(&r, Some("sweep \"foxes\""), &known, false);
        assert!(
            m.starts_with(
                "filter: 1:22: unknown field animl: no column has that name and no cell of \
                 sweep \"foxes\" has a binding of that name (did you mean animal?); the \
                 columns are sweep, id, number, state,"
            ),
            "{m}"
        );
        assert!(
            m.ends_with(
                "; the bindings of sweep \"foxes\" are alt1, animal, `cfg`, `my key` \
                 (see docs/query.md)"
            ),
            "{m}"
        );
        let sort = KeyRef {
            key: "Seed".into(),
            pos: None,
        };
        let m = unknown_binding(&sort, None, &[], false);
        assert!(m.starts_with("sort: unknown field Seed:"), "{m}");
        assert!(m.contains("(did you mean `seed`?)"), "{m}");
        assert!(m.contains("no cell of any sweep has bindings"), "{m}");

        let sweeps = [(3, "owls".to_string()), (1, "foxes".to_string())];
        assert_eq!(
            unknown_sweep(&Value::Text("fxoes".into()), &sweeps),
            "filter: no sweep is named \"fxoes\" (did you mean \"foxes\"?); the sweeps are \
             1 \"foxes\", 3 \"owls\" (`kiln sweeps` lists them)"
        );
        assert_eq!(
            unknown_sweep(&Value::Int(9), &[]),
            "filter: there is no sweep 9; there are no sweeps (`kiln sweeps` lists them)"
        );
    }

    #[test]
    fn suggestions_are_close() {
        let c = ["animal", "alt1", "seed", "cfg"];
        assert_eq!(suggest("animl", c.into_iter()), Some("animal"));
        assert_eq!(suggest("ALT1", c.into_iter()), Some("alt1"));
        assert_eq!(suggest("alt3", c.into_iter()), Some("alt1"));
        assert_eq!(suggest("zebra", c.into_iter()), None);
        assert_eq!(suggest("cf", c.into_iter()), Some("cfg"));
        assert_eq!(edits("kitten", "sitting"), 3);
    }
}
