//! A model reference a user can paste, parsed and checked before anything touches the network
//! or the disk: `hf:OWNER/REPO[@REVISION][/FILE]` (a Hugging Face hub repo, or one file of it)
//! and `https://…` (one file at a URL).
//!
//! A cell comes from the network, so every part that becomes a path is checked here: names of
//! letters, digits, `.`, `_`, `-` (and `/` between the file's folders), no `.` or `..`
//! segment, bounded lengths. What passes can be joined under a cache folder without leaving it.

/// The longest hub owner, repo or revision name.
const MAX_NAME: usize = 96;
/// The longest file path inside a repo.
const MAX_FILE: usize = 256;
/// The longest URL.
const MAX_URL: usize = 2048;

/// A parsed reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    /// `hf:OWNER/REPO[@REVISION][/FILE]`.
    Hub(HubRef),
    /// `https://…` or `http://…`: one file.
    Url(String),
}

/// A repo on a Hugging Face hub, at a revision, maybe one file of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubRef {
    /// `OWNER/REPO`.
    pub repo: String,
    /// A branch, tag or commit (`main` when not given).
    pub revision: String,
    /// One file of the repo (`unet/x.safetensors`), or the repo as a model.
    pub file: Option<String>,
}

impl HubRef {
    /// `models--OWNER--REPO`, the repo's folder in a hub cache.
    pub fn cache_folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

impl std::fmt::Display for HubRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hf:{}@{}", self.repo, self.revision)?;
        if let Some(file) = &self.file {
            write!(f, "/{file}")?;
        }
        Ok(())
    }
}

/// Whether `text` is written as a reference of this module (it may still be refused by
/// [`Reference::parse`]); anything else is a file name for the `--models` folders.
pub fn is_reference(text: &str) -> bool {
    text.starts_with("hf:") || text.starts_with("https://") || text.starts_with("http://")
}

impl Reference {
    /// Parses and checks `text`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(rest) = text.strip_prefix("hf:") {
            return parse_hub(rest).map(Reference::Hub);
        }
        if text.starts_with("https://") || text.starts_with("http://") {
            if text.len() > MAX_URL {
                return Err(format!("a URL of at most {MAX_URL} bytes"));
            }
            if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err("a URL without spaces or control characters".into());
            }
            let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err("a URL with a host".into());
            }
            return Ok(Reference::Url(text.to_owned()));
        }
        Err("hf:OWNER/REPO[@REVISION][/FILE] or an https:// URL".into())
    }
}

fn parse_hub(rest: &str) -> Result<HubRef, String> {
    let expected = "hf:OWNER/REPO[@REVISION][/FILE]";
    let mut parts = rest.splitn(3, '/');
    let owner = parts.next().unwrap_or_default();
    let repo_rev = parts.next().ok_or_else(|| expected.to_string())?;
    let file = parts.next();
    let (repo, revision) = match repo_rev.split_once('@') {
        Some((repo, rev)) => (repo, rev),
        None => (repo_rev, "main"),
    };
    check_name(owner, "owner")?;
    check_name(repo, "repo")?;
    check_name(revision, "revision")?;
    let file = match file {
        None | Some("") => None,
        Some(file) => {
            if file.len() > MAX_FILE {
                return Err(format!("a file path of at most {MAX_FILE} bytes"));
            }
            for segment in file.split('/') {
                check_name(segment, "file path segment")?;
            }
            Some(file.to_owned())
        }
    };
    Ok(HubRef {
        repo: format!("{owner}/{repo}"),
        revision: revision.to_owned(),
        file,
    })
}

/// A name that is safe as one path segment on every OS: 1..=96 bytes of letters, digits, `.`,
/// `_`, `-`, not starting with `.` (so never `.` or `..`).
fn check_name(name: &str, what: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?}: 1..={MAX_NAME} letters, digits, `.`, `_` or `-`, not starting \
             with `.`"
        ))
    }
}

/// Whether `name` is safe as a file name in a cache folder (an ETag, a file name).
pub(crate) fn is_safe_name(name: &str) -> bool {
    check_name(name, "").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_references_parse_with_defaults() {
        let r = Reference::parse("hf:latent-consistency/lcm-lora-sdv1-5").unwrap();
        assert_eq!(
            r,
            Reference::Hub(HubRef {
                repo: "latent-consistency/lcm-lora-sdv1-5".into(),
                revision: "main".into(),
                file: None,
            })
        );
        let Reference::Hub(r) = Reference::parse("hf:o/r@v1.0/unet/w.safetensors").unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.repo.as_str(), r.revision.as_str(), r.file.as_deref()),
            ("o/r", "v1.0", Some("unet/w.safetensors"))
        );
        assert_eq!(r.cache_folder(), "models--o--r");
        assert_eq!(r.to_string(), "hf:o/r@v1.0/unet/w.safetensors");
    }

    #[test]
    fn references_that_could_leave_the_cache_are_refused() {
        for bad in [
            "hf:../x",
            "hf:a/b/../../c",
            "hf:a/b/./c",
            "hf:a/b//c",
            "hf:/a/b",
            "hf:a",
            "hf:a/..",
            "hf:a/b@../c",
            "hf:a/b/c\\d",
            "hf:a/b/C:",
            "hf:a/.git/x",
            "ftp://x/y",
            "https://",
            "https://x/a b",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
        let long = format!("hf:o/r/{}", "a/".repeat(200));
        assert!(Reference::parse(&long).is_err());
        assert!(is_reference("hf:x") && is_reference("https://x") && !is_reference("lcm"));
        assert!(Reference::parse("https://example.com/a/b.safetensors?x=1").is_ok());
    }
}
