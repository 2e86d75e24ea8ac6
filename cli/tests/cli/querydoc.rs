//! `docs/query.md`, run: the sweeps in its ```` ```toml sweep ```` blocks are submitted to a real
//! coordinator and rendered by a real worker (the tiny reference models, copied under the names
//! the page uses), then every command of its ```` ```sh example ```` blocks runs as a user would
//! type it (through `sh`), and must succeed and return the count its comment states
//! (`# 16 cells`, `# 8 images`); every command of a ```` ```sh error ```` block must fail with
//! the text of the ```` ```text ```` block after it. The page and the program cannot drift apart.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::spawn;
use crate::util::{Worker, fixtures, json_rows, kiln};

/// The page, read when the test runs.
fn page() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/query.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fenced block: its info string (`sh example`) and its text.
#[derive(Debug)]
struct Block {
    info: String,
    text: String,
}

/// The fenced blocks of a markdown text, in order.
fn blocks(md: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for line in md.lines() {
        match (open.take(), line.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    info: info.trim().to_string(),
                    text: String::new(),
                })
            }
            (Some(b), Some(_)) => out.push(b),
            (Some(mut b), None) => {
                b.text.push_str(line);
                b.text.push('\n');
                open = Some(b);
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "an unclosed ``` block");
    out
}

/// The commands of a block: its lines that start with `kiln `.
fn commands(b: &Block) -> impl Iterator<Item = &str> {
    b.text.lines().filter(|l| l.starts_with("kiln "))
}

/// What a command's comment says it returns: `# 16 cells` → (16, "cell").
fn expected(line: &str) -> Option<(usize, &'static str)> {
    let comment = line.rsplit_once('#')?.1.trim();
    let (n, what) = comment.split_once(' ')?;
    let n = n.parse().ok()?;
    let what = if what.starts_with("cell") {
        "cell"
    } else if what.starts_with("image") {
        "image"
    } else {
        return None;
    };
    Some((n, what))
}

/// Copies `from` (a folder) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// A `--models` folder with the files the page's sweeps name: the tiny SD1.5 folder as
/// `dreamshaper_8`, its LoRA as `lcm-lora-sdv1-5` and `detail`, its VAE override as
/// `vae-ft-mse-840000-ema-pruned` — and no `kl-f8-anime2`, whose cells fail.
fn models(dir: &Path) -> PathBuf {
    let m = dir.join("models");
    copy_dir(&fixtures().join("tiny-sd15"), &m.join("dreamshaper_8"));
    for name in ["lcm-lora-sdv1-5", "detail"] {
        std::fs::copy(
            fixtures().join("lora_kohya.safetensors"),
            m.join(format!("{name}.safetensors")),
        )
        .unwrap();
    }
    std::fs::copy(
        fixtures().join("vae_override.safetensors"),
        m.join("vae-ft-mse-840000-ema-pruned.safetensors"),
    )
    .unwrap();
    m
}

/// Runs `line` through `sh` in `dir`, with this build's `kiln` first on the PATH.
fn sh(dir: &Path, addr: &str, line: &str) -> Output {
    let bin = Path::new(env!("CARGO_BIN_EXE_kiln")).parent().unwrap();
    let path = std::env::join_paths(std::iter::once(bin.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    Command::new("sh")
        .args(["-c", line])
        .current_dir(dir)
        .env("PATH", path)
        .env("KILN_COORDINATOR", format!("http://{addr}"))
        .env("KILN_LOG", "warn")
        .output()
        .unwrap()
}

/// Rows of `kiln query` output: the JSON array's length with `--format json`, else the lines
/// that start with a cell id (table and CSV rows).
fn rows(line: &str, stdout: &str) -> usize {
    if line.contains("--format json") {
        json_rows(stdout).len()
    } else {
        stdout
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .count()
    }
}

#[cfg(unix)]
#[test]
fn every_example_in_the_query_docs_runs() {
    let md = page();
    let blocks = blocks(&md);
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let worker = Worker(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["worker", "--coordinator", &format!("http://{}", c.addr)])
            .args(["--idle-poll-ms", "50", "--name", "gaming-pc-1"])
            .arg("--storage")
            .arg(format!("file://{}", dir.path().join("out").display()))
            .arg("--models")
            .arg(models(dir.path()))
            // The page's failing cells are expected: no warnings for them.
            .env("KILN_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The sweeps, at 64x64: the page's 512x512 would only be slower.
    let mut names = Vec::new();
    for b in blocks.iter().filter(|b| b.info == "toml sweep") {
        assert!(b.text.contains("size = \"512x512\""), "{}", b.text);
        let text = b.text.replace("size = \"512x512\"", "size = \"64x64\"");
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("a sweep block names its sweep")
            .to_string();
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        let out = kiln(&c.addr, &["submit", file.to_str().unwrap()]);
        assert!(
            out.contains(&format!("sweep {} submitted", names.len() + 1)),
            "{out}"
        );
        names.push(name);
    }
    assert_eq!(names, ["foxes", "owls"]);
    for name in &names {
        kiln(&c.addr, &["watch", name]);
    }

    let mut ran = 0;
    for b in blocks.iter().filter(|b| b.info == "sh example") {
        for line in commands(b) {
            let out = sh(dir.path(), &c.addr, line);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{line}\nfailed: {}{stdout}",
                String::from_utf8_lossy(&out.stderr)
            );
            let is_query = line.starts_with("kiln query");
            let redirected = line.contains(" > ");
            match expected(line) {
                Some((n, "cell")) => assert_eq!(rows(line, &stdout), n, "{line}\n{stdout}"),
                Some((n, _)) => assert!(
                    stdout.contains(&format!("{n} images written")),
                    "{line}\n{stdout}"
                ),
                // Every query on the page says what it finds, unless it writes a file.
                None => assert!(!is_query || redirected, "{line}: no `# N cells`"),
            }
            ran += 1;
        }
    }
    assert!(
        ran >= 30,
        "only {ran} examples found: is the page's markup intact?"
    );
    assert!(dir.path().join("foxes.csv").exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("best")).unwrap().count(),
        8
    );
    assert!(dir.path().join("foxes-grid.png").exists());

    let mut refused = 0;
    for (i, b) in blocks
        .iter()
        .enumerate()
        .filter(|(_, b)| b.info == "sh error")
    {
        let says = blocks
            .get(i + 1)
            .filter(|t| t.info == "text")
            .unwrap_or_else(|| panic!("no ```text block after {}", b.text));
        for line in commands(b) {
            let out = sh(dir.path(), &c.addr, line);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{line} succeeded");
            assert!(
                stderr.contains(says.text.trim()),
                "{line}\nsays:\n{stderr}\nthe page says:\n{}",
                says.text
            );
            refused += 1;
        }
    }
    assert!(refused >= 4, "only {refused} error examples found");
    drop(worker);
}

#[test]
fn the_page_parser_finds_blocks_and_counts() {
    let b =
        blocks("a\n```sh example\nkiln query 'x'  # 16 cells\nnot this\n```\n```text\nt\n```\n");
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].info, "sh example");
    assert_eq!(
        commands(&b[0]).collect::<Vec<_>>(),
        ["kiln query 'x'  # 16 cells"]
    );
    assert_eq!(b[1].text, "t\n");
    assert_eq!(expected("kiln query 'x'  # 16 cells"), Some((16, "cell")));
    assert_eq!(
        expected("kiln fetch 'x' -o a/  # 8 images"),
        Some((8, "image"))
    );
    assert_eq!(expected("kiln query 'seed = 1'"), None);
}
