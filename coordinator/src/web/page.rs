//! The frame every page shares (navigation, embedded CSS and JavaScript), the error page, and
//! small formatting helpers. Every value goes through maud, which escapes it: nothing a user
//! or a worker wrote can become markup.

use axum::http::StatusCode;
use maud::{DOCTYPE, Markup, html};

use super::assets;

/// A whole page: `title` and `body` in the shared frame.
pub(super) fn frame(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · kiln" }
                link rel="stylesheet" href=(assets::CSS_PATH);
                script src=(assets::JS_PATH) defer {}
            }
            body {
                nav.top {
                    a.brand href="/" { "kiln" }
                    a href="/" { "Farm" }
                    a href="/gallery" { "Gallery" }
                    a href="/xy" { "X/Y" }
                }
                main { (body) }
            }
        }
    }
}

/// The page shown for an error: its status and message; a sign-in form for 401.
pub(super) fn error_page(status: StatusCode, message: &str) -> Markup {
    if status == StatusCode::UNAUTHORIZED {
        return frame("Sign in", login_form(None, None));
    }
    frame(
        status.canonical_reason().unwrap_or("Error"),
        html! {
            section.error-page {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                p.error { (message) }
                p { a href="/" { "Back to the farm" } }
            }
        },
    )
}

/// The sign-in form (also shown in place of any page that needs it).
pub(super) fn login_form(next: Option<&str>, error: Option<&str>) -> maud::Markup {
    html! {
        section.login {
            h1 { "Sign in" }
            p { "This coordinator requires a token (" code { "kiln token create" } ")." }
            @if let Some(e) = error { p.error { (e) } }
            form method="post" action="/login" {
                input type="hidden" name="next" value=(local(next));
                input type="password" name="token" placeholder="kiln_…" autocomplete="current-password" required;
                button type="submit" { "Sign in" }
            }
        }
    }
}

/// Where to go after signing in: a path on this site only.
pub(super) fn local(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/",
    }
}

/// A duration in ms, as people read it: `850 ms`, `12 s`, `3 min 5 s`, `2 h 10 min`.
pub(super) fn duration(ms: i64) -> String {
    let s = ms / 1000;
    match ms {
        ..0 => "—".into(),
        0..1000 => format!("{ms} ms"),
        1000..60_000 => format!("{s} s"),
        60_000..3_600_000 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s / 60 % 60),
    }
}

/// A unix-ms time as `YYYY-MM-DD HH:MM:SS` UTC.
pub(super) fn time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's civil-from-days).
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations_read_as_people_write_them() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_796_515_200_000), "2026-12-06 00:00:00");
        assert_eq!(time(951_782_400_000 + 3_723_000), "2000-02-29 01:02:03");
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_300), "12 s");
        assert_eq!(duration(185_000), "3 min 5 s");
        assert_eq!(duration(7_800_000), "2 h 10 min");
        assert_eq!(duration(-1), "—");
    }
}
