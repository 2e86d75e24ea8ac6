//! Wildcards: the declared `__name__` lists, each value a template, checked for cycles and
//! depth before anything is counted or expanded.

use std::collections::BTreeMap;

use super::error::{PlanError, PlanErrorKind};
use super::source::{Origin, SweepSource};
use super::template::{Template, WildcardValues};

/// One value of a wildcard, with its place.
#[derive(Clone, Debug)]
pub(crate) struct WildcardValue {
    /// Parsed value.
    pub template: Template,
    /// Where it was written.
    pub origin: Origin,
}

/// The declared wildcards, each a list of template values.
#[derive(Clone, Debug, Default)]
pub(crate) struct Wildcards {
    entries: BTreeMap<String, Vec<WildcardValue>>,
    /// Values per wildcard, counting nested choices; filled by [`Wildcards::check`].
    counts: BTreeMap<String, u128>,
    /// Just the templates, for expansion.
    templates: BTreeMap<String, Vec<Template>>,
}

impl WildcardValues for Wildcards {
    fn values(&self, name: &str) -> &[Template] {
        self.templates.get(name).map_or(&[], Vec::as_slice)
    }
}

impl Wildcards {
    /// Adds a wildcard's values.
    pub(crate) fn insert(&mut self, name: String, values: Vec<WildcardValue>) {
        self.templates.insert(
            name.clone(),
            values.iter().map(|v| v.template.clone()).collect(),
        );
        self.entries.insert(name, values);
    }

    /// Variant counts per wildcard.
    pub(crate) fn counts(&self) -> &BTreeMap<String, u128> {
        &self.counts
    }

    /// Rejects cycles and chains deeper than `max_depth`, then counts each wildcard's
    /// variants. Errors point at the offending `__name__` inside a wildcard value.
    pub(crate) fn check(&mut self, src: &SweepSource, max_depth: usize) -> Result<(), PlanError> {
        let mut heights = BTreeMap::new();
        let names: Vec<String> = self.entries.keys().cloned().collect();
        for name in &names {
            let mut stack = vec![name.clone()];
            self.height(name, &mut stack, &mut heights, src, max_depth)?;
        }
        // Acyclic now: count bottom-up by increasing height.
        let mut order: Vec<(&String, &usize)> = heights.iter().collect();
        order.sort_by_key(|(_, h)| **h);
        let mut counts = BTreeMap::new();
        for (name, _) in order {
            let c = self
                .values(name)
                .iter()
                .fold(0u128, |s, t| s.saturating_add(t.count(&counts)));
            counts.insert(name.clone(), c);
        }
        self.counts = counts;
        Ok(())
    }

    /// Height of `name`'s reference tree (1 = refers to no wildcard); `stack` holds the
    /// chain being visited, `name` last.
    fn height(
        &self,
        name: &str,
        stack: &mut Vec<String>,
        heights: &mut BTreeMap<String, usize>,
        src: &SweepSource,
        max_depth: usize,
    ) -> Result<usize, PlanError> {
        if let Some(h) = heights.get(name) {
            return Ok(*h);
        }
        let mut height = 1;
        for value in self.entries.get(name).map_or(&[][..], Vec::as_slice) {
            for (child, offset) in value.template.references() {
                let place = || value.origin.place(src, &value.template.text, offset);
                if stack.iter().any(|s| s == child) {
                    let mut path = stack.clone();
                    path.push(child.to_string());
                    return Err(PlanError::new(
                        place(),
                        PlanErrorKind::WildcardCycle(path.join(" → ")),
                    ));
                }
                let too_deep = |path: &[String]| {
                    PlanError::new(
                        place(),
                        PlanErrorKind::WildcardTooDeep {
                            limit: max_depth,
                            path: path.join(" → "),
                        },
                    )
                };
                stack.push(child.to_string());
                if stack.len() > max_depth {
                    return Err(too_deep(stack));
                }
                let h = self.height(child, stack, heights, src, max_depth)?;
                if stack.len() - 1 + h > max_depth {
                    return Err(too_deep(stack));
                }
                stack.pop();
                height = height.max(1 + h);
            }
        }
        heights.insert(name.to_string(), height);
        Ok(height)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::sweep::template::Grammar;

    fn src() -> SweepSource {
        SweepSource::new("t.toml", "")
    }

    fn wildcards(defs: &[(&str, &[&str])]) -> Wildcards {
        let names: BTreeSet<String> = defs.iter().map(|(n, _)| n.to_string()).collect();
        let g = Grammar {
            wildcards: &names,
            max_nesting: 8,
        };
        let mut w = Wildcards::default();
        for (name, values) in defs {
            let values = values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let origin = Origin::Line {
                        file: format!("{name}.txt"),
                        line: i as u32 + 1,
                        col: 1,
                    };
                    WildcardValue {
                        template: Template::parse(v.to_string(), &origin, &src(), &g).unwrap(),
                        origin,
                    }
                })
                .collect();
            w.insert(name.to_string(), values);
        }
        w
    }

    #[test]
    fn wildcards_expand_with_prefixed_bindings() {
        let mut w = wildcards(&[
            ("animal", &["fox", "{red|grey} wolf"]),
            ("scene", &["__animal__ in snow"]),
        ]);
        w.check(&src(), 8).unwrap();
        let names: BTreeSet<String> = ["animal", "scene"].map(String::from).into();
        let g = Grammar {
            wildcards: &names,
            max_nesting: 4,
        };
        let origin = Origin::Line {
            file: "p.txt".into(),
            line: 1,
            col: 1,
        };
        let text = "__animal__ and __animal__; __scene__".to_string();
        let t = Template::parse(text, &origin, &src(), &g).unwrap();
        assert_eq!(t.count(w.counts()), 27);
        let v = t.expand(&w);
        assert_eq!(v.len(), 27);
        assert_eq!(v[0].text, "fox and fox; fox in snow");
        let last = v.last().unwrap();
        assert_eq!(last.text, "grey wolf and grey wolf; grey wolf in snow");
        let keys: Vec<&str> = last.bindings.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "animal",
                "animal.alt1",
                "animal.2",
                "animal.2.alt1",
                "scene",
                "scene.animal",
                "scene.animal.alt1"
            ]
        );
        // A wildcard binds the text its value produced, not the value as written.
        let values: Vec<&str> = last.bindings.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(
            values,
            [
                "grey wolf",
                "grey",
                "grey wolf",
                "grey",
                "grey wolf in snow",
                "grey wolf",
                "grey"
            ]
        );
    }

    #[test]
    fn a_choice_binds_the_text_it_produced() {
        let mut w = wildcards(&[("animal", &["red fox", "{snowy|barn} owl"])]);
        w.check(&src(), 8).unwrap();
        let names: BTreeSet<String> = ["animal".to_string()].into();
        let g = Grammar {
            wildcards: &names,
            max_nesting: 4,
        };
        let origin = Origin::Line {
            file: "p.txt".into(),
            line: 1,
            col: 1,
        };
        // A named list whose option holds a wildcard and an escaped `|`, then an optional word.
        let text = r"a {style=__animal__ \| sketch|photo}, {|very }dark".to_string();
        let v = Template::parse(text, &origin, &src(), &g)
            .unwrap()
            .expand(&w);
        assert_eq!(v.len(), 8);
        assert_eq!(v[4].text, "a barn owl | sketch, dark");
        assert_eq!(
            v[4].bindings,
            [
                ("style".to_string(), "barn owl | sketch".to_string()),
                ("animal".into(), "barn owl".into()),
                ("animal.alt1".into(), "barn".into()),
                ("alt1".into(), String::new()),
            ]
        );
        assert_eq!(
            v[7].bindings,
            [
                ("style".to_string(), "photo".to_string()),
                ("alt1".into(), "very".into())
            ]
        );
    }

    #[test]
    fn wildcard_cycles_and_depth() {
        let mut w = wildcards(&[("a", &["x __b__"]), ("b", &["y", "__a__"])]);
        let e = w.check(&src(), 8).unwrap_err();
        assert_eq!(e.kind, PlanErrorKind::WildcardCycle("a → b → a".into()));
        assert_eq!(e.to_string(), "b.txt:2:1: wildcard cycle: a → b → a");

        let mut w = wildcards(&[("a", &["__b__"]), ("b", &["__c__"]), ("c", &["z"])]);
        assert!(w.clone().check(&src(), 3).is_ok());
        let e = w.check(&src(), 2).unwrap_err();
        assert!(
            matches!(e.kind, PlanErrorKind::WildcardTooDeep { limit: 2, .. }),
            "{e}"
        );
    }
}
