//! The web UI in a real headless Chromium (Debian's `chromium`, driven by its `chromedriver`
//! over WebDriver), against a real `kiln coordinator` and a real `kiln worker` rendering the
//! tiny model: live progress without a reload, the gallery's filter and count, an image's
//! page, starring seen by `kiln query 'starred'`, the X/Y layout, bad input, and prompts that
//! try to inject markup. Each page's screenshot is saved under `target/web-screenshots/`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::util::{fixtures, json_rows, kiln, spawn_worker};

/// The chromedriver process, killed when the test ends.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts chromedriver and a headless Chromium session. No Chromium is a failure, not a skip:
/// `.ci/run` installs it (Debian's chromium and chromium-driver).
async fn browser() -> (Driver, Client) {
    let port = free_port();
    let driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian: apt-get install chromium chromium-driver)"),
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"] }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => return (driver, c),
            Err(e) if Instant::now() > deadline => panic!("no WebDriver session: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Where screenshots go: `target/web-screenshots/`.
fn shots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

/// Runs `script` in the page and returns its value.
async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap()
}

/// Waits (at most `limit`) until `script` returns true in the page.
async fn until(c: &Client, script: &str, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while js(c, script).await != Value::Bool(true) {
        assert!(Instant::now() < deadline, "{what}: timed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The HTTP status of a GET from the page.
async fn status(c: &Client, path: &str) -> u64 {
    c.execute_async(
        "const [p, done] = arguments; fetch(p).then(r => done(r.status));",
        vec![json!(path)],
    )
    .await
    .unwrap()
    .as_u64()
    .unwrap()
}

/// A sweep whose third choice tries to inject markup and script, with quotes and Unicode.
const HOSTILE: &str =
    r#"<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> 'q' "dq" 狐 ü"#;

fn sweep_file(dir: &Path) -> PathBuf {
    let text = format!(
        "name = \"webfox\"\nmodel = \"tiny-sd15\"\nsampler = \"lcm\"\nsteps = 2\ncfg = 1.0\n\
         width = 64\nheight = 64\nseeds = {{ from = 1, count = 2 }}\n\
         prompt = {prompt}\n",
        prompt = toml_string(&format!("a {{red|arctic|{HOSTILE}}} fox")),
    );
    let file = dir.join("webfox.toml");
    std::fs::write(&file, text).unwrap();
    file
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn web_ui_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("out");
    std::fs::create_dir_all(&storage).unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let images = format!("file://{}", storage.display());
    let c = crate::spawn_with(&db, dir.path(), &["--images", &images]);
    let base = format!("http://{}", c.addr);
    let file = sweep_file(dir.path());
    let out = kiln(&c.addr, &["submit", file.to_str().unwrap()]);
    assert!(out.contains("sweep 1 submitted"), "{out}");

    let (_driver, b) = browser().await;

    // 1. The overview shows the sweep waiting; a worker starts, and the page's counts advance
    //    without a reload (a marker set in the page survives).
    b.goto(&format!("{base}/")).await.unwrap();
    until(
        &b,
        "return !!document.querySelector('#sweeps-body tr[data-sweep=\"1\"]')",
        Duration::from_secs(10),
        "sweep row",
    )
    .await;
    let done = "return document.querySelector('#sweeps-body tr[data-sweep=\"1\"] td[data-f=done]').textContent";
    assert_eq!(js(&b, done).await, json!("0"));
    js(&b, "window.__marker = 42; return true").await;
    let models = fixtures();
    let _worker = spawn_worker(&c.addr, &storage, &[models.as_path()]);
    let seen = Instant::now();
    let mut counts = Vec::new();
    loop {
        let n: u64 = js(&b, done).await.as_str().unwrap().parse().unwrap();
        if counts.last() != Some(&n) {
            counts.push(n);
        }
        if n == 6 {
            break;
        }
        assert!(
            seen.elapsed() < Duration::from_secs(120),
            "progress: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(counts.len() >= 2, "the count never moved: {counts:?}");
    assert_eq!(
        js(&b, "return window.__marker").await,
        json!(42),
        "the page reloaded"
    );
    until(
        &b,
        "return document.querySelector('#workers-body tr') !== null",
        Duration::from_secs(10),
        "worker row",
    )
    .await;
    screenshot(&b, "overview").await;

    // 2. The gallery filters by a binding and shows the right count.
    b.goto(&format!("{base}/gallery?q={}", enc("alt1 = \"arctic\"")))
        .await
        .unwrap();
    until(
        &b,
        "return document.getElementById('count').dataset.count !== undefined",
        Duration::from_secs(10),
        "count",
    )
    .await;
    assert_eq!(
        js(&b, "return document.querySelectorAll('#grid .tile').length").await,
        json!(2)
    );
    assert_eq!(
        js(&b, "return document.getElementById('count').textContent").await,
        json!("2 matches")
    );
    let all = json_rows(&kiln(
        &c.addr,
        &["query", "alt1 = \"arctic\"", "--format", "json"],
    ));
    let ids: Vec<u64> = all.iter().map(|r| r["cell"].as_u64().unwrap()).collect();
    let shown: Vec<u64> = serde_json::from_value(
        js(
            &b,
            "return [...document.querySelectorAll('#grid .tile')].map(t => Number(t.dataset.cell))",
        )
        .await,
    )
    .unwrap();
    // Across sweeps, newest first: the same cells as `kiln query`, in another order.
    let (mut shown_sorted, mut ids_sorted) = (shown.clone(), ids.clone());
    shown_sorted.sort();
    ids_sorted.sort();
    assert_eq!(shown_sorted, ids_sorted);
    until(
        &b,
        "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)",
        Duration::from_secs(20),
        "thumbnails",
    )
    .await;
    screenshot(&b, "gallery").await;
    // The query box offers binding keys as one types.
    js(
        &b,
        "const q = document.getElementById('q'); q.value = 'sweep = 1 and al';
         q.dispatchEvent(new Event('input')); return true",
    )
    .await;
    until(
        &b,
        "return [...document.querySelectorAll('#q-keys option')].some(o => o.value === 'sweep = 1 and alt1')",
        Duration::from_secs(10),
        "binding keys offered",
    )
    .await;

    // 3. An image's page shows its seed and infotext.
    b.find(Locator::Css("#grid .tile"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &b,
        "return !!document.getElementById('infotext')",
        Duration::from_secs(10),
        "detail",
    )
    .await;
    let cell = shown[0];
    let row = all
        .iter()
        .find(|r| r["cell"].as_u64() == Some(cell))
        .unwrap();
    let seed = row["seed"].as_u64().unwrap();
    assert_eq!(
        js(&b, "return document.getElementById('seed').textContent").await,
        json!(seed.to_string())
    );
    let infotext = js(&b, "return document.getElementById('infotext').textContent").await;
    assert!(
        infotext
            .as_str()
            .unwrap()
            .contains(&format!("Seed: {seed}")),
        "{infotext}"
    );
    assert!(
        js(&b, "return document.getElementById('image').naturalWidth")
            .await
            .as_u64()
            .unwrap()
            == 64
    );

    // 4. Starring it makes it appear in `kiln query 'starred'`.
    assert!(json_rows(&kiln(&c.addr, &["query", "starred", "--format", "json"])).is_empty());
    b.find(Locator::Css(".keeper [data-star]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &b,
        "return document.querySelector('.keeper [data-star]').dataset.star === '1'",
        Duration::from_secs(10),
        "star",
    )
    .await;
    screenshot(&b, "detail").await;
    let starred = json_rows(&kiln(&c.addr, &["query", "starred", "--format", "json"]));
    let starred: Vec<u64> = starred
        .iter()
        .map(|r| r["cell"].as_u64().unwrap())
        .collect();
    assert_eq!(starred, [cell]);

    // 5. The X/Y view puts each image on its own binding's column and seed's row.
    b.goto(&format!("{base}/xy?q={}&x=alt1&y=seed", enc("sweep = 1")))
        .await
        .unwrap();
    let tiles = js(&b, "return [...document.querySelectorAll('#xy td[data-cell]')].map(t => [Number(t.dataset.cell), t.dataset.x, t.dataset.y])").await;
    let tiles: Vec<(u64, String, String)> = serde_json::from_value(tiles).unwrap();
    assert_eq!(tiles.len(), 6, "{tiles:?}");
    let every = json_rows(&kiln(&c.addr, &["query", "sweep = 1", "--format", "json"]));
    for (id, x, y) in &tiles {
        let r = every
            .iter()
            .find(|r| r["cell"].as_u64() == Some(*id))
            .unwrap();
        assert_eq!(r["bindings"]["alt1"].as_str().unwrap(), x, "cell {id}");
        assert_eq!(r["seed"].as_u64().unwrap().to_string(), *y, "cell {id}");
    }
    let header: Vec<String> = serde_json::from_value(
        js(
            &b,
            "return [...document.querySelectorAll('#xy th.x')].map(t => t.textContent)",
        )
        .await,
    )
    .unwrap();
    assert_eq!(header.len(), 3);
    assert!(header.contains(&HOSTILE.to_string()), "{header:?}");
    screenshot(&b, "xy").await;
    assert_eq!(
        status(&b, "/xy.png?q=sweep%20%3D%201&x=alt1&y=seed").await,
        200
    );

    // The zip of everything a query matches holds its images, under their default names.
    let names = b
        .execute_async(
            "const [q, done] = arguments;
             fetch('/download.zip?q=' + encodeURIComponent(q)).then(r => r.arrayBuffer()).then(buf => {
               const u = new Uint8Array(buf), names = [];
               for (let i = 0; i + 30 < u.length; i++) {
                 if (u[i] === 0x50 && u[i+1] === 0x4b && u[i+2] === 3 && u[i+3] === 4) {
                   const n = u[i+26] | (u[i+27] << 8);
                   names.push(new TextDecoder().decode(u.slice(i + 30, i + 30 + n)));
                 }
               }
               done(names);
             });",
            vec![json!("alt1 = \"arctic\"")],
        )
        .await
        .unwrap();
    let names: Vec<String> = serde_json::from_value(names).unwrap();
    let expected: Vec<String> = all
        .iter()
        .map(|r| {
            format!(
                "1-{:06}-{}.png",
                r["number"].as_u64().unwrap(),
                r["seed"].as_u64().unwrap()
            )
        })
        .collect();
    let (mut names, mut expected) = (names, expected);
    names.sort();
    expected.sort();
    assert_eq!(names, expected);

    // 6. Nothing in a prompt became markup or ran: the hostile text is text everywhere.
    for page in [
        "/",
        "/gallery?q=sweep%20%3D%201",
        "/sweeps/1",
        &format!("/cells/{}", hostile_cell(&every)),
    ] {
        b.goto(&format!("{base}{page}")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            js(&b, "return window.__pwned === undefined").await,
            json!(true),
            "{page}"
        );
        assert_eq!(
            js(&b, "return document.scripts.length").await,
            json!(1),
            "{page}"
        );
        assert_eq!(
            js(&b, "return document.querySelectorAll('img[src=x]').length").await,
            json!(0),
            "{page}"
        );
        let text = js(&b, "return document.body.textContent").await;
        // The sweep page shows the sweep file, where the quotes are TOML-escaped.
        let shown = if page.starts_with("/sweeps/") {
            screenshot(&b, "sweep").await;
            "<script>window.__pwned=1</script>"
        } else {
            HOSTILE
        };
        assert!(
            text.as_str().unwrap().contains(shown) || page == "/",
            "{page}: the prompt is not shown as text: {text}"
        );
    }

    // 7. Bad input: a malformed filter shows the parser's error in place; unknown ids are 404s.
    b.goto(&format!("{base}/gallery?q={}", enc("cfg >= ")))
        .await
        .unwrap();
    let err = js(
        &b,
        "return document.getElementById('query-error').textContent",
    )
    .await;
    assert!(err.as_str().unwrap().contains("1:"), "{err}");
    assert_eq!(
        js(&b, "return document.getElementById('q').value").await,
        json!("cfg >= ")
    );
    screenshot(&b, "bad-filter").await;
    assert_eq!(status(&b, "/cells/999999").await, 404);
    assert_eq!(status(&b, "/images/999999").await, 404);
    assert_eq!(status(&b, "/thumbs/abc").await, 404);
    assert_eq!(status(&b, "/no/such/page").await, 404);
    b.close().await.unwrap();
}

/// The id of the cell whose prompt holds [`HOSTILE`].
fn hostile_cell(rows: &[Value]) -> u64 {
    rows.iter()
        .find(|r| r["prompt"].as_str().is_some_and(|p| p.contains("__pwned")))
        .and_then(|r| r["cell"].as_u64())
        .expect("a hostile cell")
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `kiln ARGS` with the token `token`, against `addr`; its stdout, after asserting success.
fn kiln_as(addr: &str, token: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_COORDINATOR", format!("http://{addr}"))
        .env("KILN_TOKEN", token)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kiln {args:?}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `POST path` from the page with a JSON body, with or without the CSRF header; its status.
async fn post_status(c: &Client, path: &str, body: Value, csrf: bool) -> u64 {
    c.execute_async(
        "const [p, b, csrf, done] = arguments;
         const h = {'content-type': 'application/json'};
         if (csrf) h['x-kiln-csrf'] = '1';
         fetch(p, {method: 'POST', headers: h, body: JSON.stringify(b)}).then(r => done(r.status));",
        vec![json!(path), body, json!(csrf)],
    )
    .await
    .unwrap()
    .as_u64()
    .unwrap()
}

async fn sign_in(b: &Client, base: &str, token: &str) {
    b.goto(&format!("{base}/login")).await.unwrap();
    b.find(Locator::Css("input[name=token]"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    // A marker in the sign-in page: gone once the browser has loaded the page the form leads to.
    js(b, "window.__signing = 1; return true").await;
    b.find(Locator::Css("form[action='/login'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        b,
        "return window.__signing === undefined && document.readyState === 'complete'",
        Duration::from_secs(20),
        "the page after signing in",
    )
    .await;
}

/// With `--require-tokens` the web UI is behind the same tokens as the gRPC API: a sign-in
/// form first, a read token reads but cannot star, another owner's sweep is refused, changes
/// need the CSRF header, and a submit token stars.
#[tokio::test(flavor = "multi_thread")]
async fn web_ui_uses_the_coordinators_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let token = |owner: &str, scope: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["token", "create", "--owner", owner, "--scope", scope])
            .env("KILN_DB", &db)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (reader, submitter, stranger) = (
        token("me", "read"),
        token("me", "submit"),
        token("eve", "read"),
    );
    let c = crate::spawn_with(&db, dir.path(), &["--require-tokens"]);
    let base = format!("http://{}", c.addr);
    let file = sweep_file(dir.path());
    let out = kiln_as(&c.addr, &submitter, &["submit", file.to_str().unwrap()]);
    assert!(out.contains("sweep 1 submitted"), "{out}");
    let (_driver, b) = browser().await;

    // Without a token: a sign-in form, and every page and API refuses.
    b.goto(&format!("{base}/")).await.unwrap();
    assert_eq!(
        js(&b, "return !!document.querySelector('input[name=token]')").await,
        json!(true)
    );
    assert_eq!(
        js(&b, "return !!document.getElementById('farm')").await,
        json!(false)
    );
    screenshot(&b, "sign-in").await;
    for path in [
        "/",
        "/events",
        "/gallery",
        "/gallery/count",
        "/keys",
        "/cells/1",
        "/thumbs/1",
        "/sweeps/1",
        "/download.zip",
    ] {
        assert_eq!(status(&b, path).await, 401, "{path}");
    }
    sign_in(&b, &base, "kiln_0000").await;
    assert_eq!(
        js(
            &b,
            "return document.querySelector('.login .error').textContent"
        )
        .await,
        json!("unknown or revoked token")
    );

    // A read token of the sweep's owner reads, and cannot star.
    sign_in(&b, &base, &reader).await;
    until(
        &b,
        "return !!document.querySelector('#sweeps-body tr[data-sweep=\"1\"]')",
        Duration::from_secs(10),
        "sweep row",
    )
    .await;
    assert_eq!(status(&b, "/cells/1").await, 200);
    assert_eq!(
        post_status(&b, "/cells/1/keeper", json!({"starred": true}), true).await,
        403
    );

    // Another owner's read token sees no sweep of "me".
    sign_in(&b, &base, &stranger).await;
    until(
        &b,
        "return !!document.getElementById('farm')",
        Duration::from_secs(10),
        "overview",
    )
    .await;
    assert_eq!(
        js(
            &b,
            "return document.querySelectorAll('#sweeps-body tr').length"
        )
        .await,
        json!(0)
    );
    assert_eq!(status(&b, "/sweeps/1").await, 403);
    assert_eq!(status(&b, "/cells/1").await, 403);

    // A submit token stars, with the CSRF header only.
    sign_in(&b, &base, &submitter).await;
    until(
        &b,
        "return !!document.getElementById('farm')",
        Duration::from_secs(10),
        "overview",
    )
    .await;
    assert_eq!(
        post_status(&b, "/cells/1/keeper", json!({"starred": true}), false).await,
        403
    );
    assert!(
        kiln_as(&c.addr, &reader, &["query", "starred"])
            .trim()
            .lines()
            .count()
            <= 1
    );
    assert_eq!(
        post_status(&b, "/cells/1/keeper", json!({"starred": true}), true).await,
        200
    );
    let starred = json_rows(&kiln_as(
        &c.addr,
        &reader,
        &["query", "starred", "--format", "json"],
    ));

    // The sweep buttons: pause holds the sweep's cells, resume releases them; the row follows
    // live.
    let state =
        "return document.querySelector('#sweeps-body tr[data-sweep=\"1\"] .state').textContent";
    b.goto(&format!("{base}/")).await.unwrap();
    until(
        &b,
        "return !!document.querySelector('button[data-action=pause]:not([disabled])')",
        Duration::from_secs(10),
        "pause button",
    )
    .await;
    // The rows are re-rendered by every event: click by script, not by a held element.
    js(
        &b,
        "document.querySelector('button[data-action=pause]').click(); return true",
    )
    .await;
    until(
        &b,
        &format!("{state} === 'paused'"),
        Duration::from_secs(10),
        "paused",
    )
    .await;
    let status_text = kiln_as(&c.addr, &reader, &["status", "1"]);
    assert!(status_text.contains(" 6 held"), "{status_text}");
    screenshot(&b, "overview-paused").await;
    // The rows are re-rendered by every event: click by script, not by a held element.
    js(
        &b,
        "document.querySelector('button[data-action=resume]').click(); return true",
    )
    .await;
    until(
        &b,
        &format!("{state} === 'active'"),
        Duration::from_secs(10),
        "resumed",
    )
    .await;
    assert_eq!(starred.len(), 1);
    assert_eq!(starred[0]["cell"], json!(1));
    b.close().await.unwrap();
}
