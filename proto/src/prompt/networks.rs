//! A1111's extra networks: the `<kind:arg:arg…>` tags that A1111 cuts out of a positive prompt
//! before anything else reads it (`modules/extra_networks.py`, `re_extra_net =
//! <(\w+):([^>]+)>`), and what a `<lora:…>` tag means (`extra_networks_lora.py`).
//!
//! Owns finding the tags and reading LoRA strengths; resolving a name to a file is the
//! worker's business.

use std::fmt;

use super::syntax::{Rewritten, is_py_space, is_py_word};

/// An extra-network tag as A1111 finds it: `<kind:name:arg…>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraNetwork {
    /// What comes before the first `:` (`lora`, `hypernet`, …).
    pub kind: String,
    /// The first `:`-separated item after the kind, as written.
    pub name: String,
    /// The other `:`-separated items, as written.
    pub args: Vec<String>,
}

impl ExtraNetwork {
    /// Whether A1111 reads this tag as a LoRA: `lora`, or its alias `lyco`.
    pub fn is_lora(&self) -> bool {
        self.kind == "lora" || self.kind == "lyco"
    }
}

impl fmt::Display for ExtraNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}:{}", self.kind, self.name)?;
        for arg in &self.args {
            write!(f, ":{arg}")?;
        }
        f.write_str(">")
    }
}

/// A LoRA a prompt asks for: `<lora:NAME:TE[:UNET[:DYN]]>`, where the items may also be named
/// (`te=`, `unet=`, `dyn=`; a named one wins over its position). A missing TE strength is 1.0 and
/// the UNet strength defaults to the TE one, as in A1111. `DYN` (a rank limit) is checked to be
/// an integer but not kept: kiln merges whole LoRAs.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraRef {
    /// The LoRA's name (A1111: the file stem or an alias).
    pub name: String,
    /// Strength in the text encoder.
    pub te: f32,
    /// Strength in the UNet.
    pub unet: f32,
}

impl LoraRef {
    /// Reads a `lora`/`lyco` tag as `ExtraNetworkLora.activate` does; the error says what does
    /// not read.
    pub(super) fn from_network(network: &ExtraNetwork) -> Result<Self, String> {
        let mut positional = Vec::new();
        let mut named = Vec::new();
        // `ExtraNetworkParams`: an item with exactly one `=` is named, any other is positional.
        for item in std::iter::once(&network.name).chain(&network.args) {
            match item.split_once('=') {
                Some((key, value)) if !value.contains('=') => named.push((key, value)),
                _ => positional.push(item.as_str()),
            }
        }
        let named_value = |key: &str| named.iter().rev().find(|(k, _)| *k == key).map(|kv| kv.1);
        let name = positional
            .first()
            .ok_or("it names no LoRA (the first positional item is the name)")?;
        let mut te = match positional.get(1) {
            Some(s) => strength(s, "text-encoder strength")?,
            None => 1.0,
        };
        if let Some(s) = named_value("te") {
            te = strength(s, "te=")?;
        }
        let mut unet = match positional.get(2) {
            Some(s) => strength(s, "UNet strength")?,
            None => te,
        };
        if let Some(s) = named_value("unet") {
            unet = strength(s, "unet=")?;
        }
        for dyn_dim in positional
            .get(3)
            .copied()
            .into_iter()
            .chain(named_value("dyn"))
        {
            dyn_dim
                .trim_matches(is_py_space)
                .parse::<i64>()
                .map_err(|_| format!("dyn `{dyn_dim}` is not an integer"))?;
        }
        Ok(Self {
            name: (*name).to_owned(),
            te: te as f32,
            unet: unet as f32,
        })
    }
}

/// A strength as Python's `float()` reads it (surrounding whitespace allowed), finite.
fn strength(text: &str, what: &str) -> Result<f64, String> {
    match text.trim_matches(is_py_space).parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!(
            "{what} `{text}` is not a number (e.g. `<lora:name:0.8>`)"
        )),
    }
}

/// Cuts every `<(\w+):([^>]+)>` out of `text`, leftmost first, as `re.sub` does; returns the
/// rest and each tag with its byte offset in `text`.
pub(super) fn extract(text: &str) -> (Rewritten, Vec<(ExtraNetwork, usize)>) {
    let mut rest = Rewritten::new();
    let mut found = Vec::new();
    let mut copied = 0;
    let mut search = 0;
    while let Some(i) = text[search..].find('<') {
        let open = search + i;
        match tag_at(text, open) {
            Some((network, end)) => {
                rest.push(copied, &text[copied..open]);
                found.push((network, open));
                copied = end;
                search = end;
            }
            None => search = open + 1,
        }
    }
    rest.push(copied, &text[copied..]);
    (rest, found)
}

/// The tag starting at the `<` at byte `open`, and the offset just past its `>`.
fn tag_at(text: &str, open: usize) -> Option<(ExtraNetwork, usize)> {
    let after = &text[open + 1..];
    let kind_len = after
        .char_indices()
        .find(|&(_, c)| !is_py_word(c))
        .map_or(after.len(), |(i, _)| i);
    if kind_len == 0 || !after[kind_len..].starts_with(':') {
        return None;
    }
    let args_from = kind_len + 1;
    let close = after[args_from..].find('>')?;
    if close == 0 {
        return None;
    }
    let mut items = after[args_from..args_from + close]
        .split(':')
        .map(str::to_owned);
    let network = ExtraNetwork {
        kind: after[..kind_len].to_owned(),
        name: items.next().unwrap_or_default(),
        args: items.collect(),
    };
    Some((network, open + 1 + args_from + close + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(tag: &str) -> Result<LoraRef, String> {
        let (_, found) = extract(tag);
        LoraRef::from_network(&found[0].0)
    }

    fn lora_ref(name: &str, te: f32, unet: f32) -> LoraRef {
        LoraRef {
            name: name.into(),
            te,
            unet,
        }
    }

    #[test]
    fn tags_are_cut_leftmost_first() {
        let (rest, found) = extract("a <lora:x:0.5>b <hypernet:h> <bad> <no:> <:x> c<lora:y>");
        assert_eq!(rest.text, "a b  <bad> <no:> <:x> c");
        let names: Vec<String> = found.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, ["<lora:x:0.5>", "<hypernet:h>", "<lora:y>"]);
        assert_eq!(found[0].1, 2);
        // `[^>]+` runs to the first `>`, across a second `<`.
        let (rest, found) = extract("<lora:a <lora:b:1> z");
        assert_eq!(rest.text, " z");
        assert_eq!(found[0].0.name, "a <lora");
    }

    #[test]
    fn lora_strengths_follow_a1111() {
        assert_eq!(lora("<lora:x>"), Ok(lora_ref("x", 1.0, 1.0)));
        assert_eq!(lora("<lora:x:0.7>"), Ok(lora_ref("x", 0.7, 0.7)));
        assert_eq!(lora("<lora:x:0.5:0.8>"), Ok(lora_ref("x", 0.5, 0.8)));
        assert_eq!(lora("<lora:x:0.5:0.8:16>"), Ok(lora_ref("x", 0.5, 0.8)));
        assert_eq!(lora("<lora:x: 0.5 >"), Ok(lora_ref("x", 0.5, 0.5)));
        // Named items win, and an unnamed UNet strength follows te= as well.
        assert_eq!(lora("<lora:x:te=0.3>"), Ok(lora_ref("x", 0.3, 0.3)));
        assert_eq!(lora("<lora:x:1:unet=0.2>"), Ok(lora_ref("x", 1.0, 0.2)));
        assert_eq!(lora("<lyco:x:0.4>"), Ok(lora_ref("x", 0.4, 0.4)));
    }

    #[test]
    fn unreadable_lora_tags_are_errors() {
        for tag in [
            "<lora:x:abc>",
            "<lora:x:1:abc>",
            "<lora:x:te=abc>",
            "<lora:x:inf>",
            "<lora:x:1:1:1.5>",
            "<lora:te=1>",
        ] {
            assert!(lora(tag).is_err(), "{tag}");
        }
        assert!(lora("<lora:x:abc>").unwrap_err().contains("`abc`"));
    }
}
