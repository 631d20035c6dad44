//! Hostile requests: credentials, Segment settings, shapes, paths, methods,
//! headers and the admin API.

use super::*;

/// Credentials that are missing, wrong or mangled.
pub(super) fn credentials() -> Vec<Case> {
    let mut cases = Vec::new();
    let schemes: Vec<(&str, Vec<u8>, u16)> = vec![
        ("Basic without credentials", b"Basic".to_vec(), 401),
        ("Basic, not base64", b"Basic !!!not-base64!!!".to_vec(), 401),
        ("unknown key", basic("wk-wrong").into_bytes(), 401),
        ("empty key", basic("").into_bytes(), 401),
        (
            "key with a different case",
            basic(&WRITE_KEY.to_uppercase()).into_bytes(),
            401,
        ),
        ("key prefix", basic(&WRITE_KEY[..5]).into_bytes(), 401),
        (
            "Bearer with the write key",
            format!("Bearer {WRITE_KEY}").into_bytes(),
            401,
        ),
        (
            "lower-case basic",
            basic(WRITE_KEY).replace("Basic", "basic").into_bytes(),
            200,
        ),
        (
            "upper-case BASIC",
            basic(WRITE_KEY).replace("Basic", "BASIC").into_bytes(),
            200,
        ),
        (
            "key without the colon",
            format!("Basic {}", b64(WRITE_KEY.as_bytes())).into_bytes(),
            200,
        ),
        (
            "invalid UTF-8 in the credentials",
            format!("Basic {}", b64(b"\xff\xfe:")).into_bytes(),
            401,
        ),
        (
            "non-ASCII header bytes",
            b"Basic \xe2\x82\xac\xe2\x82\xac".to_vec(),
            401,
        ),
        (
            "Digest scheme",
            b"Digest username=\"a\", realm=\"b\"".to_vec(),
            401,
        ),
        // Not a valid header byte: the HTTP layer answers 400.
        ("ANSI escape", b"Basic \x1b[31m".to_vec(), 0),
    ];
    for path in ["/v1/track", "/v1/batch", "/segment"] {
        let body = wrap(path, &message(path, "creds"));
        cases.push(
            ingest(format!("{path} no credentials"), path, &body)
                .without("Authorization")
                .expect(error(401, "unauthorized")),
        );
        for (what, value, expected) in &schemes {
            let mut m = message(path, &format!("creds-{what}-{path}"));
            m["userId"] = json!(format!("creds-{path}"));
            let body = wrap(path, &m);
            let expect = if *expected == 0 {
                any_of(&[400, 401]).protocol()
            } else if *expected == 401 {
                error(401, "unauthorized")
            } else {
                any_of(&[*expected])
            };
            cases.push(
                ingest(format!("{path} {what}"), path, &body)
                    .without("Authorization")
                    .header("Authorization", value.clone())
                    .expect(expect),
            );
        }
    }
    // writeKey in the body (Tracking API only).
    for (what, key, expect) in [
        ("right", json!(WRITE_KEY), any_of(&[200])),
        ("wrong", json!("nope"), error(401, "unauthorized")),
        (
            "a number",
            json!(12),
            error(400, "invalid_field").naming("writeKey"),
        ),
        (
            "an object",
            json!({"k": 1}),
            error(400, "invalid_field").naming("writeKey"),
        ),
    ] {
        let mut m = message("/v1/track", &format!("body-key-{what}"));
        m["writeKey"] = key;
        cases.push(
            ingest(
                format!("/v1/track writeKey in body {what}"),
                "/v1/track",
                m.to_string().as_bytes(),
            )
            .without("Authorization")
            .expect(expect),
        );
    }
    // Webhook signatures.
    enum Sig {
        Missing,
        Raw(Vec<u8>),
        Of(fn(String) -> String),
        BasicKeyOnly,
    }
    let sigs: Vec<(&str, Sig, Expect)> = vec![
        (
            "missing",
            Sig::Missing,
            error(401, "unauthorized").naming("X-Signature"),
        ),
        ("empty", Sig::Raw(vec![]), error(401, "unauthorized")),
        (
            "not hex",
            Sig::Raw(b"zzzz".to_vec()),
            error(401, "unauthorized"),
        ),
        (
            "of another body",
            Sig::Raw(hmac_hex(b"{}").into_bytes()),
            error(401, "unauthorized"),
        ),
        (
            "truncated",
            Sig::Of(|s| s[..20].to_owned()),
            error(401, "unauthorized"),
        ),
        (
            "zeros",
            Sig::Raw(hex::encode([0u8; 20]).into_bytes()),
            error(401, "unauthorized"),
        ),
        (
            "with a sha1= prefix",
            Sig::Of(|s| format!("sha1={s}")),
            any_of(&[200, 401]),
        ),
        (
            "upper-case hex",
            Sig::Of(|s| s.to_uppercase()),
            any_of(&[200, 401]),
        ),
        (
            "doubled",
            Sig::Of(|s| s.repeat(2)),
            error(401, "unauthorized"),
        ),
        (
            "4 KB long",
            Sig::Raw("a".repeat(4096).into_bytes()),
            error(401, "unauthorized"),
        ),
        (
            "non-ASCII bytes",
            Sig::Raw(b"\xff\xfe\xfd".to_vec()),
            error(401, "unauthorized"),
        ),
        (
            "Basic key instead of a signature",
            Sig::BasicKeyOnly,
            error(401, "unauthorized"),
        ),
    ];
    for (i, (what, sig, expect)) in sigs.into_iter().enumerate() {
        let mut m = message("/webhook", &format!("sig-{i}"));
        m["userId"] = json!(format!("sig-{i}"));
        let plain = wrap("/webhook", &m);
        let c = Case::new(format!("/webhook X-Signature {what}"), "POST", "/webhook")
            .header("Content-Type", "application/json")
            .body(plain.clone())
            .expect(expect);
        cases.push(match sig {
            Sig::Missing => c,
            Sig::Raw(v) => c.header("X-Signature", v),
            Sig::Of(f) => c.header("X-Signature", f(hmac_hex(&plain))),
            Sig::BasicKeyOnly => c.header("Authorization", basic(WRITE_KEY)),
        });
    }
    cases
}

/// `X-Segment-Settings` that is not what `/segment` takes.
pub(super) fn segment_settings() -> Vec<Case> {
    let settings: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            "not base64",
            b"%%%not-base64%%%".to_vec(),
            error(400, "invalid_settings"),
        ),
        (
            "base64 of text",
            b64(b"hello").into_bytes(),
            error(400, "invalid_settings"),
        ),
        (
            "base64 of an array",
            b64(b"[1,2]").into_bytes(),
            error(400, "invalid_settings"),
        ),
        (
            "base64 of null",
            b64(b"null").into_bytes(),
            error(400, "invalid_settings"),
        ),
        (
            "unknown region",
            b64(br#"{"region":"mars"}"#).into_bytes(),
            error(400, "invalid_settings").naming("region"),
        ),
        (
            "trackNamedPages as text",
            b64(br#"{"trackNamedPages":"yes please"}"#).into_bytes(),
            error(400, "invalid_settings"),
        ),
        (
            "serviceId as an object",
            b64(br#"{"serviceId":{"a":1}}"#).into_bytes(),
            error(400, "invalid_settings"),
        ),
        (
            "endpoint (SSRF attempt, ignored)",
            b64(br#"{"endpoint":"http://169.254.169.254/"}"#).into_bytes(),
            any_of(&[200]),
        ),
        (
            "URL-safe base64",
            base64::engine::general_purpose::URL_SAFE
                .encode(br#"{"serviceId":"SP-1234-01","defaultModule":"??>>"}"#)
                .into_bytes(),
            any_of(&[200]),
        ),
        (
            "empty serviceId (configured one applies)",
            b64(br#"{"serviceId":""}"#).into_bytes(),
            any_of(&[200]),
        ),
        (
            "non-ASCII bytes",
            b"\xff\xfe\xfd".to_vec(),
            error(400, "invalid_settings"),
        ),
        ("empty", b"".to_vec(), error(400, "invalid_settings")),
        (
            "deeply nested JSON",
            b64(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).as_bytes()).into_bytes(),
            error(400, "invalid_settings"),
        ),
        (
            "invalid UTF-8 JSON",
            b64(b"{\"serviceId\":\"\xff\"}").into_bytes(),
            error(400, "invalid_settings"),
        ),
    ];
    settings
        .into_iter()
        .enumerate()
        .map(|(i, (what, value, expect))| {
            let mut m = message("/segment", &format!("settings-{i}"));
            m["userId"] = json!(format!("settings-{i}"));
            ingest(
                format!("/segment X-Segment-Settings {what}"),
                "/segment",
                m.to_string().as_bytes(),
            )
            .header("X-Segment-Settings", value)
            .expect(expect)
        })
        .collect()
}

/// Valid JSON of the wrong shape: arrays where one message is taken,
/// non-object items, unknown types, empty batches.
pub(super) fn shapes() -> Vec<Case> {
    let mut cases = Vec::new();
    let arr = json!([message("/v1/track", "arr")]).to_string();
    for path in ["/v1/track", "/v1/identify", "/segment"] {
        cases.push(
            ingest(format!("{path} array body"), path, arr.as_bytes()).expect(any_of(&[400])),
        );
    }
    for (what, body, expect) in [
        ("object without batch", r#"{"type":"track"}"#.to_owned(), any_of(&[400])),
        ("batch as text", r#"{"batch":"x"}"#.to_owned(), any_of(&[400])),
        ("batch as object", r#"{"batch":{"0":{}}}"#.to_owned(), any_of(&[400])),
        ("empty batch", r#"{"batch":[]}"#.to_owned(), any_of(&[200, 400])),
        ("non-object items", r#"{"batch":[1,"a",null,[]]}"#.to_owned(), any_of(&[200, 400])),
        ("context as text", r#"{"batch":[],"context":"x"}"#.to_owned(), any_of(&[400])),
        ("integrations as array", r#"{"batch":[],"integrations":[1]}"#.to_owned(), any_of(&[400])),
        ("sentAt as object", r#"{"batch":[],"sentAt":{}}"#.to_owned(), any_of(&[400])),
        // Items of unknown type may become item-level rejections (issue 7.1).
        (
            "unknown type",
            json!({"batch":[{"type":"explode","userId":"u","messageId":"bad-type-b"}]}).to_string(),
            any_of(&[200, 400]),
        ),
        (
            "type with a NUL",
            json!({"batch":[{"type":"track\u{0}","userId":"u"}]}).to_string(),
            any_of(&[200, 400]),
        ),
        (
            "type in upper case",
            json!({"batch":[{"type":"TRACK","userId":"u"}]}).to_string(),
            any_of(&[200, 400]),
        ),
        (
            "__proto__ keys",
            json!({"batch":[{"type":"identify","userId":"u","messageId":"proto","context":{"groupId":"g"},"traits":{"__proto__":{"x":1},"constructor":{"prototype":1}}}]}).to_string(),
            any_of(&[200]),
        ),
        (
            "duplicate keys",
            r#"{"batch":[{"type":"track","type":"identify","userId":"u","userId":{"x":1}}]}"#.to_owned(),
            any_of(&[200, 400]),
        ),
    ] {
        cases.push(ingest(format!("/v1/batch {what}"), "/v1/batch", body.as_bytes()).expect(expect));
    }
    for (what, body, expect) in [
        ("empty array", "[]".to_owned(), any_of(&[200, 400])),
        ("array of numbers", "[1,2,3]".to_owned(), any_of(&[400])),
        ("array with null", r#"[null]"#.to_owned(), any_of(&[400])),
        ("nested arrays", "[[{}]]".to_owned(), any_of(&[400])),
        (
            "unknown type",
            json!({"type":"explode","userId":"u"}).to_string(),
            error(400, "unknown_type"),
        ),
        (
            "missing type",
            json!({"userId":"u"}).to_string(),
            any_of(&[400]),
        ),
    ] {
        cases.push(ingest(format!("/webhook {what}"), "/webhook", body.as_bytes()).expect(expect));
    }
    for (what, body, expect) in [
        (
            "unknown type",
            json!({"type":"explode","userId":"u"}),
            error(400, "unknown_type"),
        ),
        (
            "missing type",
            json!({"userId":"u"}),
            error(400, "missing_type"),
        ),
        ("empty object", json!({}), error(400, "missing_type")),
    ] {
        cases.push(
            ingest(
                format!("/segment {what}"),
                "/segment",
                body.to_string().as_bytes(),
            )
            .expect(expect),
        );
    }
    cases
}

/// Paths with junk: percent-encoded control bytes, traversal, raw bytes.
pub(super) fn paths() -> Vec<Case> {
    let body = message("/v1/track", "paths").to_string();
    let targets: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("percent NUL", b"/v1/%00".to_vec(), error(404, "not_found")),
        (
            "percent ANSI",
            b"/v1/%1b%5b31mred".to_vec(),
            error(404, "not_found"),
        ),
        (
            "traversal",
            b"/v1/..%2f..%2fetc%2fpasswd".to_vec(),
            any_of(&[404]),
        ),
        (
            "dot segments",
            b"/v1/../../etc/passwd".to_vec(),
            any_of(&[404, 405]),
        ),
        (
            "encoded newline",
            b"/v1/track%0aINFO%20forged".to_vec(),
            error(404, "not_found"),
        ),
        ("upper case", b"/v1/TRACK".to_vec(), error(404, "not_found")),
        (
            "extra segment",
            b"/v1/track/extra".to_vec(),
            error(404, "not_found"),
        ),
        ("double slash", b"//v1/track".to_vec(), any_of(&[404, 200])),
        ("invalid percent", b"/v1/track%zz".to_vec(), any_of(&[404])),
        (
            "percent-encoded invalid UTF-8",
            b"/%ff%fe".to_vec(),
            error(404, "not_found"),
        ),
        (
            "junk query",
            b"/v1/track?%ff=%00&a=%1b".to_vec(),
            any_of(&[200]),
        ),
        (
            "matrix params",
            b"/v1/track;jsessionid=1".to_vec(),
            error(404, "not_found"),
        ),
        (
            "5 KB segment",
            format!("/v1/{}", "a".repeat(5000)).into_bytes(),
            error(404, "not_found"),
        ),
        (
            "admin id NUL",
            b"/api/messages/%00".to_vec(),
            any_of(&[400, 404, 405]),
        ),
        (
            "raw byte 0x80",
            b"/v1/\x80".to_vec(),
            any_of(&[400, 404]).protocol(),
        ),
        (
            "raw space",
            b"/v1/tr ack".to_vec(),
            any_of(&[400]).protocol(),
        ),
        (
            "absolute URI",
            b"http://evil.example/v1/track".to_vec(),
            any_of(&[200, 400, 404]),
        ),
        ("asterisk", b"*".to_vec(), any_of(&[400, 404]).protocol()),
        (
            "no leading slash",
            b"v1/track".to_vec(),
            any_of(&[400, 404]).protocol(),
        ),
        (
            "fragment",
            b"/v1/track#frag".to_vec(),
            any_of(&[200, 400, 404]).protocol(),
        ),
    ];
    targets
        .into_iter()
        .map(|(what, target, expect)| {
            let mut c = ingest(format!("path {what}"), "/v1/track", body.as_bytes()).expect(expect);
            c.target = target;
            c
        })
        .collect()
}

/// Methods a path does not take.
pub(super) fn methods() -> Vec<Case> {
    let mut cases = Vec::new();
    for (m, path) in [
        ("GET", "/v1/track"),
        ("PUT", "/v1/track"),
        ("DELETE", "/segment"),
        ("PATCH", "/v1/batch"),
        ("GET", "/webhook"),
        ("PUT", "/webhook"),
        ("OPTIONS", "/v1/track"),
        ("POST", "/healthz"),
        ("POST", "/metrics"),
        ("DELETE", "/api/messages/1"),
        ("PUT", "/api/replay"),
        ("GET", "/api/replay"),
        ("POST", "/"),
        ("TRACE", "/"),
        ("CONNECT", "/v1/track"),
    ] {
        cases.push(
            ingest(format!("{m} {path}"), path, b"{}")
                .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
                .expect(any_of(&[404, 405]))
                .tap(|c| c.method = m.into()),
        );
    }
    cases.push(
        Case::new("HEAD /v1/track", "HEAD", "/v1/track")
            .length(Length::Omit)
            .expect(any_of(&[404, 405]).protocol()),
    );
    cases.push(
        Case::new("custom method BREW", "BREW", "/v1/track")
            .length(Length::Omit)
            .expect(any_of(&[404, 405])),
    );
    cases
}

/// Headers that are huge, many, contradictory or hostile.
pub(super) fn headers() -> Vec<Case> {
    let body = message("/v1/track", "headers").to_string();
    let base = || ingest("", "/v1/track", body.as_bytes());
    let mut many = base();
    for i in 0..200 {
        many = many.header(&format!("X-Junk-{i}"), "x");
    }
    vec![
        base()
            .header("X-Huge", "a".repeat(1024 * 1024))
            .expect(any_of(&[431, 400]).protocol()),
        base()
            .header("X-Big", "a".repeat(100 * 1024))
            .expect(any_of(&[200, 431]).protocol()),
        many.expect(any_of(&[431, 400, 200]).protocol()),
        base()
            .length(Length::Declared("-1".into()))
            .expect(any_of(&[400]).protocol()),
        base()
            .length(Length::Declared("abc".into()))
            .expect(any_of(&[400]).protocol()),
        base()
            .header("Content-Length", body.len().to_string())
            .expect(any_of(&[200, 400]).protocol()),
        base()
            .header("Content-Length", "1")
            .expect(any_of(&[400]).protocol()),
        base()
            .header("Transfer-Encoding", "chunked")
            .expect(any_of(&[400]).protocol()),
        base()
            .header("Transfer-Encoding", "gzip")
            .expect(any_of(&[400, 501]).protocol()),
        base()
            .header("Content-Type", "text/plain")
            .expect(any_of(&[200])),
        base()
            .without("Content-Type")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .expect(any_of(&[200, 400, 415])),
        base()
            .header("X-Request-Id", "\x1b[31mforged\nline")
            .expect(any_of(&[200, 400]).protocol()),
        base()
            .header("X-Request-Id", "r".repeat(8 * 1024))
            .expect(any_of(&[200])),
        base()
            .header("X-Request-Id", b"\xff\xfe".to_vec())
            .expect(any_of(&[200])),
        base()
            .header("Host", "")
            .expect(any_of(&[200, 400]).protocol()),
        base().header("Host", "evil.example").expect(any_of(&[200])),
        base()
            .header("Expect", "100-continue")
            .expect(any_of(&[200, 417])),
        base()
            .header("Expect", "teapot")
            .expect(any_of(&[200, 417])),
        base()
            .header("Authorization", basic("second-key"))
            .expect(any_of(&[200, 401, 400])),
        base()
            .header("X-Forwarded-For", "1.2.3.4, \x1b[0m")
            .expect(any_of(&[200, 400]).protocol()),
        base()
            .header("Connection", "upgrade")
            .header("Upgrade", "h2c")
            .expect(any_of(&[200, 400])),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, mut c)| {
        c.name = format!("headers #{i}");
        c
    })
    .collect()
}

/// The admin API and operator page without or with a wrong credential.
pub(super) fn admin() -> Vec<Case> {
    let mut cases = Vec::new();
    let wrong: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("no credential", None),
        ("wrong token", Some(b"Bearer wrong-token".to_vec())),
        (
            "token prefix",
            Some(format!("Bearer {}", &ADMIN_TOKEN[..6]).into_bytes()),
        ),
        (
            "token plus a byte",
            Some(format!("Bearer {ADMIN_TOKEN}x").into_bytes()),
        ),
        ("empty Bearer", Some(b"Bearer ".to_vec())),
        (
            "Basic with the token",
            Some(basic(ADMIN_TOKEN).into_bytes()),
        ),
        (
            "write key",
            Some(format!("Bearer {WRITE_KEY}").into_bytes()),
        ),
        ("non-ASCII", Some(b"Bearer \xff\xfe".to_vec())),
        (
            "token with a NUL",
            Some(format!("Bearer {ADMIN_TOKEN}\0").into_bytes()),
        ),
    ];
    for (m, path) in [
        ("GET", "/api/messages"),
        ("GET", "/api/stats"),
        ("GET", "/api/messages/1"),
        ("POST", "/api/replay"),
        ("POST", "/api/messages/1/replay"),
    ] {
        for (what, value) in &wrong {
            let mut c = Case::new(format!("{m} {path} {what}"), m, path)
                .length(Length::Auto)
                .expect(error(401, "unauthorized"));
            if let Some(v) = value {
                c = c.header("Authorization", v.clone());
            }
            // A NUL is not a valid header byte: the HTTP layer may refuse it.
            if what.contains("NUL") {
                c.expect = any_of(&[400, 401]).protocol();
            }
            cases.push(c);
        }
    }
    let auth = format!("Bearer {ADMIN_TOKEN}");
    for (m, target, expect) in [
        (
            "GET",
            "/api/messages?limit=99999999999999999999",
            any_of(&[400]),
        ),
        ("GET", "/api/messages?limit=-1", any_of(&[400])),
        ("GET", "/api/messages?outcome=%3Cscript%3E", any_of(&[400])),
        ("GET", "/api/messages?before=abc", any_of(&[400])),
        ("GET", "/api/messages?nope=1", any_of(&[400])),
        ("GET", "/api/messages?userId=%00%ff%1b", any_of(&[200])),
        (
            "GET",
            "/api/messages?messageId=' OR 1=1 --",
            any_of(&[200, 400]).protocol(),
        ),
        (
            "GET",
            "/api/messages?messageId=%27%20OR%201%3D1%20--",
            any_of(&[200]),
        ),
        ("GET", "/api/messages/-1", any_of(&[404, 400])),
        ("POST", "/api/messages/999999/replay", any_of(&[404])),
        ("POST", "/api/replay?outcome=delivered", any_of(&[400])),
        ("POST", "/api/replay?outcome=dead&limit=x", any_of(&[400])),
        ("GET", "/api/stats?x=%ff", any_of(&[200, 400])),
    ] {
        cases.push(
            Case::new(format!("{m} {target} (with token)"), m, target)
                .header("Authorization", auth.clone())
                .expect(expect),
        );
    }
    // Without a credential the page is the sign-in form (HTML, 401).
    cases.push(
        Case::new("GET / operator page", "GET", "/")
            .length(Length::Omit)
            .expect(any_of(&[401]).protocol()),
    );
    cases
}

pub(super) trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl Tap for Case {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
