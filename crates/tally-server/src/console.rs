//! The web console, served by `tally serve` at `/`.
//!
//! Three files compiled into the binary (`console/`: `index.html`,
//! `app.js`, `app.css`): no CDN, no framework fetched at run time, no
//! build step. The page holds no data; everything it shows it reads from
//! the API with the token the user signs in with (kept in the tab's
//! `sessionStorage` only, never shown), so these routes need no token and
//! sit outside `auth.rs`, like `/healthz`. Every answer carries a strict
//! Content-Security-Policy: scripts, styles and connections from this
//! origin only, no inline script or style, no framing, no forms posting
//! elsewhere.
//!
//! **Never:** inline a script or style (the policy would refuse it), or
//! reference an asset from another origin.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// What every console answer may load.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

const INDEX: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");

/// The console's bytes, for the page-weight figure.
pub fn page_weight() -> usize {
    INDEX.len() + APP_JS.len() + APP_CSS.len()
}

/// The console's routes, to merge into a server's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_carries_the_policy() {
        let response = asset(INDEX, "text/html; charset=utf-8");
        let csp = response.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.starts_with("default-src 'none'; script-src 'self';"));
        assert_eq!(response.headers()[header::X_FRAME_OPTIONS], "DENY");
    }

    /// What the policy would refuse, or what would load from elsewhere,
    /// is not in the files: no inline script or style, no other origin.
    #[test]
    fn the_files_need_nothing_the_policy_refuses() {
        for (name, text) in [
            ("index.html", INDEX),
            ("app.js", APP_JS),
            ("app.css", APP_CSS),
        ] {
            // The SVG namespace is a name, never fetched.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            for refused in [
                "http://",
                "https://",
                "style=",
                "<style",
                "javascript:",
                "eval(",
            ] {
                assert!(!text.contains(refused), "{name} contains {refused:?}");
            }
        }
        assert_eq!(INDEX.matches("<script").count(), 1);
        assert!(INDEX.contains("<script src=\"/console/app.js\" defer></script>"));
        assert!(
            !APP_JS.contains("innerHTML"),
            "app.js builds the DOM, never parses HTML"
        );
    }
}
