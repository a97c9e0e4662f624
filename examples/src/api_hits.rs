//! `api-hits`: requests per API path per minute of event time, from an nginx-style access log.
//!
//! **Input.** `input=PATH` reads a log file, or every file below a directory, through the text
//! file source (each file is a split; a restore resumes at its checkpointed byte offset).
//! Without it, `events` lines are generated from `seed` by one source subtask with one lane, in
//! line order, so every run and every restore reads the same log (see [`line`]).
//!
//! **Parsing.** Lines are nginx's `combined` (or `common`) format:
//! `203.0.113.7 - - [14/Nov/2023:22:13:20 +0000] "GET /api/orders/1234?expand=items HTTP/1.1"
//! 200 512 "-" "curl/8.4.0"`. Event time is the bracketed local time minus its offset; the
//! request target loses its query string and fragment (and the scheme and host of an
//! absolute-form target), and every all-digit path segment becomes `{id}`, so that a path
//! counts as its endpoint: `/api/orders/1234` and `/api/orders/77` both count as
//! `/api/orders/{id}` (segments with letters, such as `v2` or hex ids, stay as they are). Every
//! request counts, whatever its method and status.
//!
//! **Malformed lines** (no timestamp, an impossible date, no `"METHOD target HTTP/x.y"`
//! request, no status, ...) are skipped, as Flink's formats do with `ignore-parse-errors`, but
//! never silently: each parsing subtask logs the first few with the reason and the line
//! (`warn`), then its running count at every power of ten, and its total at the end of the
//! input. The counts are operator state, so they survive failover and rescaling.
//!
//! **Windows.** Watermarks trail the largest timestamp seen by `max_delay_ms` (bounded
//! out-of-orderness); records are keyed by path and counted in 1-minute tumbling windows.
//! `output=DIR` receives `minute_start,path,count` lines (start as ISO 8601 UTC, e.g.
//! `2023-11-14T22:13:00Z,/api/orders/{id},42`; a path holding a comma or quote is CSV-quoted)
//! through the exactly-once file sink.
//!
//! **Late requests**, whose minute was already counted when they arrived, are not counted; like
//! Flink's late side output they are logged (the first few, then counts, as above) and, with
//! `late_output=DIR`, written there as `time,method,path,status` lines (exactly once). The
//! watermark follows each source subtask's lines in the order read: files read by one subtask
//! (dealt round-robin in name order) must follow each other in time, or `max_delay_ms` must
//! cover the overlap.
//!
//! `fail_at=N` panics once in the parsing operator at its N-th line (subtask 0, first attempt);
//! with `fail_after_checkpoint=true`, if no checkpoint has completed by then, at the first line
//! after one has, so that the restart always restores one.

use crate::transactions::splitmix64;
use serde::{Deserialize, Serialize};
use sluice_operators::file_source::TextFileSource;
use sluice_operators::generator::LaneGenerator;
use sluice_runtime::snapshot::{list_state, read_list, OperatorState, Redistribution};
use sluice_runtime::{
    CheckpointId, Count, DataStream, Error, JobDefinition, JobParams, Operator, OperatorSnapshot, ParamSpec,
    RestoredState, Result, StreamEnv, TaskInfo, WatermarkStrategy, WindowAssigner, WindowResult,
};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;
use tracing::{info, warn};

/// The window size: one minute.
pub const MINUTE_MS: i64 = 60_000;
/// Where generated event time starts: 2023-11-14T22:13:20Z.
pub const BASE_SECS: i64 = 1_700_000_000;
/// Event time between two generated lines, ms: 1,200 lines a minute.
pub const MS_PER_LINE: i64 = 50;
/// A generated line is at most this much older than a line before it (the log has whole
/// seconds); `max_delay_ms` below it makes on-time lines late, depending on the batching.
pub const MAX_DISORDER_MS: i64 = 3_000;
/// How much older than their neighbours the generated late lines are: so much that they are
/// late whatever the batching, for any `max_delay_ms` up to [`MAX_DELAY_FOR_LATE_MS`].
pub const LATE_BY_SECS: i64 = 3_600;
/// The largest `max_delay_ms` for which [`expected`] holds: beyond it, the late lines' minutes
/// may still be open when they arrive.
pub const MAX_DELAY_FOR_LATE_MS: i64 = 3_000_000;
/// Generated late lines come after this many lines: the watermark advances only between source
/// batches (of up to 1,024 lines), so earlier ones could arrive before any watermark.
const FIRST_LATE_LINE: u64 = 2_048;
/// How many rejected records each subtask logs one by one before logging only counts.
const LOGGED_ONE_BY_ONE: u64 = 5;
/// Rejected lines are logged up to this many characters.
const LOGGED_CHARS: usize = 300;

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// One request of the log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Hit {
    /// Event time, ms since the epoch (UTC).
    pub time_ms: i64,
    /// The request method.
    pub method: String,
    /// The API path: the request path without query, numeric segments as `{id}`.
    pub path: String,
    /// The response status.
    pub status: u16,
}

/// `time,method,path,status`: how late requests are written.
impl fmt::Display for Hit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = csv_field(&self.path);
        write!(f, "{},{},{path},{}", iso_utc(self.time_ms), self.method, self.status)
    }
}

/// The requests to one API path in one minute.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MinuteCount {
    /// First millisecond of the minute.
    pub minute_start: i64,
    /// The API path.
    pub path: String,
    /// Requests.
    pub count: u64,
}

/// `minute_start,path,count`, the start in ISO 8601 UTC.
impl fmt::Display for MinuteCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = csv_field(&self.path);
        write!(f, "{},{path},{}", iso_utc(self.minute_start), self.count)
    }
}

/// Why a log line could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

fn fail<T>(reason: impl Into<String>) -> std::result::Result<T, ParseError> {
    Err(ParseError(reason.into()))
}

/// At most [`LOGGED_CHARS`] characters of `s` (log lines and error messages stay readable).
fn shorten(s: &str) -> String {
    match s.char_indices().nth(LOGGED_CHARS) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Parses one access log line (nginx `combined` or `common` format) into a [`Hit`]; the error
/// says what is wrong. Fields after the status (bytes, referer, user agent) are not read.
pub fn parse_line(line: &str) -> std::result::Result<Hit, ParseError> {
    let line = line.trim_end();
    if line.is_empty() {
        return fail("empty line");
    }
    let Some(open) = line.find('[') else {
        return fail("no '[' opening the timestamp");
    };
    let Some(len) = line[open..].find(']') else {
        return fail("the timestamp is not closed by ']'");
    };
    let time_ms = parse_log_time(&line[open + 1..open + len])?;
    let rest = line[open + len + 1..].trim_start();
    let Some(rest) = rest.strip_prefix('"') else {
        return fail("no quoted request after the timestamp");
    };
    let Some((request, rest)) = rest.split_once('"') else {
        return fail("the request is not closed by '\"'");
    };
    let (method, path) = parse_request(request)?;
    let status = match rest.split_whitespace().next() {
        None => return fail("no status after the request"),
        Some(s) => match s.parse::<u16>() {
            Ok(n) if s.len() == 3 && (100..=599).contains(&n) => n,
            _ => return fail(format!("invalid status '{}'", shorten(s))),
        },
    };
    Ok(Hit {
        time_ms,
        method: method.to_string(),
        path,
        status,
    })
}

/// `METHOD target HTTP/x.y` into the method and the API path.
fn parse_request(request: &str) -> std::result::Result<(&str, String), ParseError> {
    if request == "-" || request.is_empty() {
        // nginx logs "-" when the client sent no parseable request (a 400 or a timeout).
        return fail("no request line ('-')");
    }
    let parts: Vec<&str> = request.split(' ').collect();
    let [method, target, protocol] = parts[..] else {
        return fail(format!(
            "request '{}' is not 'METHOD target HTTP/x.y'",
            shorten(request)
        ));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return fail(format!("invalid method '{}'", shorten(method)));
    }
    if !protocol.starts_with("HTTP/") {
        return fail(format!("invalid protocol '{}'", shorten(protocol)));
    }
    Ok((method, api_path(target)?))
}

/// The API path of a request target: query string and fragment dropped (scheme and host too,
/// for an absolute-form target), every all-digit segment replaced by `{id}`.
pub fn api_path(target: &str) -> std::result::Result<String, ParseError> {
    let absolute = ["http://", "https://"].iter().find(|scheme| {
        target
            .get(..scheme.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(scheme))
    });
    let target = match absolute {
        // `http://host/path?q`: the path starts at the first '/' after the authority, which
        // ends at the first '/', '?' or '#'; without a '/' there (`http://host?q`) it is `/`.
        Some(scheme) => {
            let rest = &target[scheme.len()..];
            match rest.find(['/', '?', '#']) {
                Some(i) if rest[i..].starts_with('/') => &rest[i..],
                _ => "/",
            }
        }
        None => target,
    };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return fail(format!("request target '{}' is not a path", shorten(target)));
    }
    Ok(path
        .split('/')
        .map(|seg| {
            if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/"))
}

/// Parses nginx's `$time_local`, `dd/Mon/yyyy:HH:MM:SS +zzzz`, into ms since the epoch (UTC):
/// the local time minus its offset.
pub fn parse_log_time(s: &str) -> std::result::Result<i64, ParseError> {
    let bad = |what: String| ParseError(format!("timestamp '{}': {what}", shorten(s)));
    let b = s.as_bytes();
    // Checked on bytes: slicing a `str` at fixed positions could split a multibyte character.
    let shape = b"dd/Mon/yyyy:HH:MM:SS +zzzz";
    if b.len() != shape.len() || [2, 6, 11, 14, 17, 20].iter().any(|&i| b[i] != shape[i]) {
        return Err(bad("expected 'dd/Mon/yyyy:HH:MM:SS +zzzz'".into()));
    }
    let number = |from: usize, to: usize, what: &str| -> std::result::Result<i64, ParseError> {
        let digits = &b[from..to];
        if digits.iter().all(u8::is_ascii_digit) {
            Ok(digits.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
        } else {
            Err(bad(format!(
                "{what} '{}' is not a number",
                String::from_utf8_lossy(digits)
            )))
        }
    };
    let (day, year) = (number(0, 2, "day")?, number(7, 11, "year")?);
    let Some(month) = MONTHS.iter().position(|m| m.as_bytes() == &b[3..6]) else {
        return Err(bad(format!("unknown month '{}'", String::from_utf8_lossy(&b[3..6]))));
    };
    let month = month as u32 + 1;
    if day < 1 || day > days_in_month(year, month) {
        return Err(bad(format!(
            "day {day} does not exist in {}",
            MONTHS[month as usize - 1]
        )));
    }
    let (hour, minute, second) = (
        number(12, 14, "hour")?,
        number(15, 17, "minute")?,
        number(18, 20, "second")?,
    );
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad(format!("no time {hour:02}:{minute:02}:{second:02}")));
    }
    let sign = match b[21] {
        b'+' => 1,
        b'-' => -1,
        _ => return Err(bad("the offset must start with '+' or '-'".into())),
    };
    let (off_h, off_m) = (number(22, 24, "offset hours")?, number(24, 26, "offset minutes")?);
    if off_h > 23 || off_m > 59 {
        return Err(bad(format!(
            "offset {}{off_h:02}{off_m:02} out of range",
            b[21] as char
        )));
    }
    let local = days_from_civil(year, month, day as u32) * 86_400 + hour * 3_600 + minute * 60 + second;
    Ok((local - sign * (off_h * 3_600 + off_m * 60)) * 1_000)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// (date, seconds of the day) of seconds since the epoch.
fn split_day(secs: i64) -> ((i64, u32, u32), i64) {
    (civil_from_days(secs.div_euclid(86_400)), secs.rem_euclid(86_400))
}

/// ms since the epoch as ISO 8601 UTC: `2023-11-14T22:13:00Z` (milliseconds only when not 0).
pub fn iso_utc(ms: i64) -> String {
    let ((y, mo, d), sod) = split_day(ms.div_euclid(1_000));
    let millis = ms.rem_euclid(1_000);
    let frac = if millis == 0 {
        String::new()
    } else {
        format!(".{millis:03}")
    };
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}{frac}Z",
        sod / 3_600,
        sod / 60 % 60,
        sod % 60
    )
}

/// nginx's `$time_local` of a UTC time shown at `offset_min` minutes from UTC.
pub fn log_time(utc_secs: i64, offset_min: i64) -> String {
    let ((y, mo, d), sod) = split_day(utc_secs + offset_min * 60);
    let sign = if offset_min < 0 { '-' } else { '+' };
    let off = offset_min.abs();
    format!(
        "{d:02}/{}/{y:04}:{:02}:{:02}:{:02} {sign}{:02}{:02}",
        MONTHS[mo as usize - 1],
        sod / 3_600,
        sod / 60 % 60,
        sod % 60,
        off / 60,
        off % 60
    )
}

/// A CSV field: quoted (quotes doubled) when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

/// The generated log's endpoints: method and path template (`{id}`: a number).
const ENDPOINTS: [(&str, &str); 21] = [
    ("GET", "/api/users"),
    ("POST", "/api/users"),
    ("GET", "/api/users/{id}"),
    ("PUT", "/api/users/{id}"),
    ("DELETE", "/api/users/{id}"),
    ("GET", "/api/users/{id}/orders"),
    ("GET", "/api/orders"),
    ("POST", "/api/orders"),
    ("GET", "/api/orders/{id}"),
    ("PATCH", "/api/orders/{id}"),
    ("GET", "/api/orders/{id}/items"),
    ("GET", "/api/orders/{id}/items/{id}"),
    ("GET", "/api/products"),
    ("GET", "/api/products/{id}"),
    ("GET", "/api/products/{id}/reviews"),
    ("POST", "/api/products/{id}/reviews"),
    ("GET", "/api/search"),
    ("POST", "/api/auth/login"),
    ("POST", "/api/auth/logout"),
    ("GET", "/api/v2/carts/{id}"),
    ("GET", "/health"),
];
const QUERIES: [&str; 5] = [
    "?page=2",
    "?expand=items",
    "?limit=50&sort=-created",
    "?q=red+shoes",
    "?",
];
/// Time zones of the generated log's servers, minutes from UTC.
const OFFSETS: [i64; 5] = [0, 60, -300, 330, -480];
const AGENTS: [&str; 5] = [
    "curl/8.4.0",
    "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
    "okhttp/4.12.0",
    "python-requests/2.31.0",
    "Go-http-client/1.1",
];

/// What a generated line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    OnTime,
    /// [`LATE_BY_SECS`] older than its neighbours.
    Late,
    /// Broken in one of five ways.
    Malformed(u64),
}

/// Generated line `i`, structured: what the log line says, and the hit it stands for.
struct Generated {
    kind: Kind,
    utc_secs: i64,
    offset_min: i64,
    ip: String,
    method: &'static str,
    /// The endpoint template: the API path the line counts as.
    endpoint: &'static str,
    /// The request target: ids filled in, maybe a query string.
    target: String,
    status: u16,
    bytes: u64,
    agent: &'static str,
}

fn generated(seed: u64, i: u64) -> Generated {
    let h = splitmix64(seed ^ splitmix64(i));
    let r = |salt: u64| splitmix64(h ^ salt);
    let kind = if r(1).is_multiple_of(997) {
        Kind::Malformed(r(2) % 5)
    } else if i >= FIRST_LATE_LINE && r(3).is_multiple_of(499) {
        Kind::Late
    } else {
        Kind::OnTime
    };
    // Lines advance MS_PER_LINE each and lag up to MAX_DISORDER_MS behind (whole seconds).
    let jitter = (r(4) % (MAX_DISORDER_MS as u64 / 1_000 + 1)) as i64;
    let mut utc_secs = BASE_SECS + i as i64 * MS_PER_LINE / 1_000 - jitter;
    if kind == Kind::Late {
        utc_secs -= LATE_BY_SECS;
    }
    let (method, endpoint) = ENDPOINTS[(r(5) % ENDPOINTS.len() as u64) as usize];
    let mut target = String::new();
    for (n, piece) in endpoint.split("{id}").enumerate() {
        if n > 0 {
            target.push_str(&(r(10 + n as u64) % 100_000).to_string());
        }
        target.push_str(piece);
    }
    if r(6) % 4 == 0 {
        target.push_str(QUERIES[(r(7) % QUERIES.len() as u64) as usize]);
    }
    let status = match (method, r(8) % 20) {
        (_, 0) => 500,
        (_, 1) => 404,
        (_, 2) => 401,
        ("POST", _) => 201,
        ("DELETE", _) => 204,
        ("GET", 3..=5) => 304,
        _ => 200,
    };
    Generated {
        kind,
        utc_secs,
        offset_min: OFFSETS[(r(9) % OFFSETS.len() as u64) as usize],
        ip: format!("203.0.113.{}", 1 + h % 254),
        method,
        endpoint,
        target,
        status,
        bytes: if status == 204 || status == 304 {
            0
        } else {
            r(20) % 20_000
        },
        agent: AGENTS[(r(21) % AGENTS.len() as u64) as usize],
    }
}

/// Generated log line `i` (a pure function of `seed` and `i`): nginx's combined format, one
/// of about 20 endpoints with ids and sometimes a query string, servers in several time zones;
/// time advances [`MS_PER_LINE`] a line, with lines up to [`MAX_DISORDER_MS`] out of order.
/// About one line in 500 (after the first 2,048) is [`LATE_BY_SECS`] late and
/// about one in 1,000 is malformed.
pub fn line(seed: u64, i: u64) -> String {
    let g = generated(seed, i);
    let time = log_time(g.utc_secs, g.offset_min);
    let request = format!("{} {} HTTP/1.1", g.method, g.target);
    let well_formed = |time: &str, request: &str, status: u16| {
        format!(
            "{} - - [{time}] \"{request}\" {status} {} \"-\" \"{}\"",
            g.ip, g.bytes, g.agent
        )
    };
    match g.kind {
        Kind::OnTime | Kind::Late => well_formed(&time, &request, g.status),
        // Cut off in the timestamp, as a log rotated mid-write.
        Kind::Malformed(0) => format!("{} - - [{}", g.ip, &time[..14]),
        Kind::Malformed(1) => well_formed(&time.replacen(&time[3..6], "Foo", 1), &request, g.status),
        // What nginx logs for a client that sent no request.
        Kind::Malformed(2) => well_formed(&time, "-", 400),
        // A TLS handshake on the plain-HTTP port.
        Kind::Malformed(3) => well_formed(&time, "\\x16\\x03\\x01\\x02\\x00\\x01\\x00\\x01\\xFC\\x03\\x03", 400),
        Kind::Malformed(_) => format!("{} - - [{time}] \"{request}\"", g.ip),
    }
}

/// What `api-hits` outputs for the generated log, computed directly from the generator's
/// records (not by parsing its lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The window results, sorted.
    pub counts: Vec<MinuteCount>,
    /// The late requests, sorted.
    pub late: Vec<Hit>,
    /// Malformed lines.
    pub malformed: u64,
}

/// The job's output for `events` generated lines of `seed`, when `max_delay_ms` is between
/// [`MAX_DISORDER_MS`] and [`MAX_DELAY_FOR_LATE_MS`]: then no on-time line is late and every
/// late line is, whatever the batching and failures.
pub fn expected(events: u64, seed: u64) -> Expected {
    let mut counts: BTreeMap<(i64, &str), u64> = BTreeMap::new();
    let mut late = Vec::new();
    let mut malformed = 0;
    for i in 0..events {
        let g = generated(seed, i);
        let time_ms = g.utc_secs * 1_000;
        match g.kind {
            Kind::OnTime => {
                *counts
                    .entry((time_ms.div_euclid(MINUTE_MS) * MINUTE_MS, g.endpoint))
                    .or_default() += 1
            }
            Kind::Late => late.push(Hit {
                time_ms,
                method: g.method.to_string(),
                path: g.endpoint.to_string(),
                status: g.status,
            }),
            Kind::Malformed(_) => malformed += 1,
        }
    }
    late.sort();
    Expected {
        counts: counts
            .into_iter()
            .map(|((minute_start, path), count)| MinuteCount {
                minute_start,
                path: path.to_string(),
                count,
            })
            .collect(),
        late,
        malformed,
    }
}

/// Counts a subtask's rejected records (malformed lines, late requests) and logs them: the
/// first few one by one, then the running count at each power of ten, the total at the end of
/// the input. The counts are operator state (one entry per subtask, split on restore), so totals
/// hold across failover and rescaling.
#[derive(Clone)]
struct Rejections {
    /// What one is (`malformed line`; plural with an `s`), also the state's name.
    what: &'static str,
    /// What happens to it: `skipped`.
    fate: &'static str,
    /// What the records this subtask sees are, when it also sees accepted ones: `lines`.
    seen_unit: Option<&'static str>,
    operator: String,
    subtask: usize,
    seen: u64,
    rejected: u64,
}

/// 10, 100, 1000, ...
fn is_power_of_ten(mut n: u64) -> bool {
    if n < 10 {
        return false;
    }
    while n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

impl Rejections {
    fn new(what: &'static str, fate: &'static str, seen_unit: Option<&'static str>) -> Self {
        Self {
            what,
            fate,
            seen_unit,
            operator: String::new(),
            subtask: 0,
            seen: 0,
            rejected: 0,
        }
    }

    fn open(&mut self, info: &TaskInfo, restored: Option<&RestoredState>) -> Result<()> {
        (self.operator, self.subtask) = (info.name.clone(), info.subtask);
        if let Some(r) = restored {
            for (seen, rejected) in read_list::<(u64, u64)>(&r.operator, self.what)?.unwrap_or_default() {
                self.seen += seen;
                self.rejected += rejected;
            }
        }
        Ok(())
    }

    fn accept(&mut self) {
        self.seen += 1;
    }

    fn reject(&mut self, detail: impl fmt::Display) {
        self.seen += 1;
        self.rejected += 1;
        let (op, subtask, n, what, fate) = (&self.operator, self.subtask, self.rejected, self.what, self.fate);
        if n <= LOGGED_ONE_BY_ONE {
            warn!("{op} subtask {subtask}: {what} ({fate}): {detail}");
        } else if is_power_of_ten(n) {
            // Only counts from here on: the log stays short however bad the input.
            warn!("{op} subtask {subtask}: {n} {what}s so far ({fate}; the first {LOGGED_ONE_BY_ONE} logged)");
        }
    }

    fn state(&self) -> Result<OperatorState> {
        list_state(self.what, Redistribution::Split, &[(self.seen, self.rejected)])
    }

    fn summary(&self) {
        let (op, subtask, n, what, fate) = (&self.operator, self.subtask, self.rejected, self.what, self.fate);
        let of = self
            .seen_unit
            .map(|unit| format!(" of {} {unit}", self.seen))
            .unwrap_or_default();
        if n > 0 {
            warn!("{op} subtask {subtask}: {n} {what}s ({fate}){of} in total");
        } else {
            info!("{op} subtask {subtask}: no {what}s{of}");
        }
    }
}

/// Parses log lines into hits; malformed lines are counted, logged and skipped.
#[derive(Clone)]
struct ParseLog {
    fail_at: crate::FailAt,
    malformed: Rejections,
}

impl Operator for ParseLog {
    type In = String;
    type Out = Hit;

    fn open(&mut self, info: &TaskInfo, restored: Option<RestoredState>) -> Result<()> {
        self.fail_at.open(info);
        self.malformed.open(info, restored.as_ref())
    }

    fn process(&mut self, batch: Vec<String>, out: &mut Vec<Hit>) -> Result<()> {
        for line in batch {
            self.fail_at.record();
            match parse_line(&line) {
                Ok(hit) => {
                    self.malformed.accept();
                    out.push(hit);
                }
                Err(e) => self.malformed.reject(format_args!("{e}: {}", shorten(&line))),
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, _: CheckpointId) -> Result<OperatorSnapshot> {
        Ok(OperatorSnapshot {
            keyed: None,
            operator: self.malformed.state()?,
        })
    }

    fn checkpoint_complete(&mut self, _: CheckpointId) -> Result<()> {
        self.fail_at.checkpoint_complete();
        Ok(())
    }

    fn end_of_input(&mut self, _: &mut Vec<Hit>) -> Result<()> {
        self.malformed.summary();
        Ok(())
    }
}

/// Counts and logs the window's late requests, and passes them on to their sink.
#[derive(Clone)]
struct LateHits(Rejections);

impl Operator for LateHits {
    type In = Hit;
    type Out = Hit;

    fn open(&mut self, info: &TaskInfo, restored: Option<RestoredState>) -> Result<()> {
        self.0.open(info, restored.as_ref())
    }

    fn process(&mut self, batch: Vec<Hit>, out: &mut Vec<Hit>) -> Result<()> {
        for hit in &batch {
            self.0.reject(hit);
        }
        out.extend(batch);
        Ok(())
    }

    fn snapshot(&mut self, _: CheckpointId) -> Result<OperatorSnapshot> {
        Ok(OperatorSnapshot {
            keyed: None,
            operator: self.0.state()?,
        })
    }

    fn end_of_input(&mut self, _: &mut Vec<Hit>) -> Result<()> {
        self.0.summary();
        Ok(())
    }
}

/// The log's lines: from `input`, or generated. Generated lines come from one subtask (and
/// are parsed and watermarked there), so their order and the watermark are the same in every
/// run; the parallelism to pin the parsing and watermarks to is returned with them.
fn log_lines(p: &JobParams, env: &mut StreamEnv) -> Result<(DataStream<String>, Option<usize>)> {
    if let Some(input) = p.optional("input") {
        if !std::path::Path::new(input).exists() {
            return Err(Error::Config(format!(
                "api-hits input '{input}' does not exist (a log file or a directory of them)"
            )));
        }
        return Ok((
            env.source("access-logs", TextFileSource::new(input)).uid("access-logs"),
            None,
        ));
    }
    let seed: u64 = p.get("seed")?;
    let generator = LaneGenerator::new(p.get("events")?, 1, p.get("rate")?, move |i| line(seed, i));
    let lines = env
        .source("access-log-generator", generator)
        .uid("access-log-generator")
        .parallelism(1);
    Ok((lines, Some(1)))
}

fn build(p: &JobParams, env: &mut StreamEnv) -> Result<()> {
    let max_delay = Duration::from_millis(p.get("max_delay_ms")?);
    let fail_at = crate::FailAt::from_params(p)?;
    let late_output = p.optional("late_output");
    let (lines, pinned) = log_lines(p, env)?;
    let pin = |s: DataStream<Hit>| match pinned {
        Some(n) => s.parallelism(n),
        None => s,
    };
    let parse = ParseLog {
        fail_at,
        malformed: Rejections::new("malformed line", "skipped", Some("lines")),
    };
    let hits = pin(lines.transform("parse-log", move || parse.clone()).uid("parse-log"));
    let windows = pin(hits
        .assign_timestamps_and_watermarks(WatermarkStrategy::bounded_out_of_orderness(max_delay, |h: &Hit| {
            h.time_ms
        }))
        .uid("watermarks"))
    .key_by(|h: &Hit| h.path.clone())
    .window(WindowAssigner::tumbling(Duration::from_millis(MINUTE_MS as u64))?)
    .aggregate("count-per-minute", Count::default())?
    .uid("count-per-minute");
    let counts = windows
        .results()
        .map(|r: WindowResult<String, u64>| MinuteCount {
            minute_start: r.start,
            path: r.key,
            count: r.value,
        })
        .name("minute-counts");
    crate::exactly_once_output(counts, "counts-output", p.optional("output"));
    let late = LateHits(Rejections::new(
        "late request",
        if late_output.is_some() {
            "not counted, written to late_output"
        } else {
            "not counted"
        },
        None,
    ));
    let late = windows
        .late()
        .transform("late-requests", move || late.clone())
        .uid("late-requests");
    crate::exactly_once_output(late, "late-output", late_output);
    Ok(())
}

/// The job's registration.
pub fn definition() -> JobDefinition {
    let param = ParamSpec::new;
    JobDefinition {
        name: "api-hits",
        description: "requests per API path per minute of event time from an nginx-style access log",
        params: vec![
            param(
                "input",
                "",
                "an access log file or a directory of them (read in name order); empty: generate the log",
            ),
            param("events", "1000000", "generated log lines (without input)"),
            param("seed", "42", "generator seed (without input)"),
            param("rate", "0", "generated lines per second, 0 = unlimited (without input)"),
            param(
                "max_delay_ms",
                "5000",
                "how far out of order lines may be (watermark bound), ms of event time",
            ),
            crate::FailAt::PARAM,
            crate::FailAt::AFTER_CHECKPOINT_PARAM,
            param(
                "output",
                "",
                "directory receiving `minute_start,path,count` part files (exactly once)",
            ),
            param(
                "late_output",
                "",
                "directory receiving late requests as `time,method,path,status` (exactly once); empty: only logged",
            ),
        ],
        build,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"203.0.113.7 - - [14/Nov/2023:22:13:20 +0000] "GET /api/orders/1234?expand=items HTTP/1.1" 200 512 "-" "curl/8.4.0""#;

    fn hit(time_ms: i64, method: &str, path: &str, status: u16) -> Hit {
        Hit {
            time_ms,
            method: method.into(),
            path: path.into(),
            status,
        }
    }

    fn error(line: &str) -> String {
        parse_line(line).expect_err(line).to_string()
    }

    #[test]
    fn parses_combined_and_common_format_lines() {
        assert_eq!(
            parse_line(LINE),
            Ok(hit(1_700_000_000_000, "GET", "/api/orders/{id}", 200))
        );
        // Common format (no referer, no user agent), an offset east of UTC, a fragment.
        assert_eq!(
            parse_line(r#"10.0.0.1 - bob [15/Nov/2023:03:43:20 +0530] "DELETE /api/users/42#x HTTP/2.0" 204 0"#),
            Ok(hit(1_700_000_000_000, "DELETE", "/api/users/{id}", 204))
        );
        // West of UTC, a trailing carriage return, an absolute-form target.
        assert_eq!(
            parse_line("1.2.3.4 - - [14/Nov/2023:17:13:20 -0500] \"GET http://shop.example/api/v2/carts/7?x=1 HTTP/1.1\" 404 9\r"),
            Ok(hit(1_700_000_000_000, "GET", "/api/v2/carts/{id}", 404))
        );
    }

    #[test]
    fn only_all_digit_segments_become_ids() {
        let path = |t| api_path(t).unwrap();
        assert_eq!(path("/api/orders/1234/items/0007"), "/api/orders/{id}/items/{id}");
        assert_eq!(path("/api/v2/orders/12a/"), "/api/v2/orders/12a/");
        assert_eq!(path("/"), "/");
        assert_eq!(path("/api/search?q=1/2"), "/api/search");
        assert_eq!(path("https://h:8443"), "/");
        assert_eq!(path("http://h?x=1"), "/");
        assert_eq!(path("http://h#top"), "/");
        assert_eq!(path("http://h?next=/api/1"), "/");
        assert_eq!(path("HTTP://h/api/7?x=1"), "/api/{id}");
        assert!(api_path("*").unwrap_err().to_string().contains("not a path"));
    }

    #[test]
    fn times_honour_the_offset_and_the_calendar() {
        assert_eq!(parse_log_time("01/Jan/1970:00:00:00 +0000"), Ok(0));
        assert_eq!(parse_log_time("31/Dec/1969:23:59:59 +0000"), Ok(-1_000));
        assert_eq!(parse_log_time("01/Jan/1970:01:30:00 +0130"), Ok(0));
        assert_eq!(parse_log_time("29/Feb/2024:12:00:00 +0000"), Ok(1_709_208_000_000));
        assert_eq!(parse_log_time("01/Mar/2000:00:00:00 +0000"), Ok(951_868_800_000));
        for secs in (-100_000_000_i64..5_000_000_000).step_by(7_777_777) {
            for offset in OFFSETS {
                let text = log_time(secs, offset);
                assert_eq!(parse_log_time(&text), Ok(secs * 1_000), "{text}");
            }
        }
        assert_eq!(iso_utc(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(iso_utc(951_868_799_001), "2000-02-29T23:59:59.001Z");
        assert_eq!(iso_utc(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn malformed_lines_are_errors_that_say_what_is_wrong() {
        let ts = "14/Nov/2023:22:13:20 +0000";
        let with_time = |t: &str| format!(r#"1.2.3.4 - - [{t}] "GET /a HTTP/1.1" 200 1"#);
        let with_request = |r: &str| format!(r#"1.2.3.4 - - [{ts}] "{r}" 200 1"#);
        let cases = [
            (String::new(), "empty line"),
            ("   ".into(), "empty line"),
            ("this is not an access log line".into(), "no '['"),
            ("1.2.3.4 - - [14/Nov/2023:22:1".into(), "not closed by ']'"),
            (with_time("14/Foo/2023:22:13:20 +0000"), "unknown month 'Foo'"),
            (with_time("31/Nov/2023:22:13:20 +0000"), "day 31 does not exist in Nov"),
            (with_time("29/Feb/2023:22:13:20 +0000"), "day 29 does not exist in Feb"),
            (with_time("14/Nov/2023:24:00:00 +0000"), "no time 24:00:00"),
            (with_time("14/Nov/2023:22:13:2x +0000"), "second '2x' is not a number"),
            (
                with_time("14/Nov/2023:22:13:20 0000"),
                "expected 'dd/Mon/yyyy:HH:MM:SS +zzzz'",
            ),
            (with_time("14/Nov/2023:22:13:20 *0000"), "must start with '+' or '-'"),
            (with_time("14/Nov/2023:22:13:20 +0099"), "offset +0099 out of range"),
            (with_time("14/Növ/2023:22:13:20 +0000"), "expected 'dd/Mon/yyyy"),
            (with_time("2023-11-14T22:13:20Z"), "expected 'dd/Mon/yyyy"),
            (format!("1.2.3.4 - - [{ts}] GET /a HTTP/1.1 200 1"), "no quoted request"),
            (
                format!("1.2.3.4 - - [{ts}] \"GET /a HTTP/1.1 200 1"),
                "not closed by '\"'",
            ),
            (with_request("-"), "no request line"),
            (with_request("\\x16\\x03\\x01"), "is not 'METHOD target HTTP/x.y'"),
            (with_request("get /a HTTP/1.1"), "invalid method 'get'"),
            (with_request("GET /a SPDY/3"), "invalid protocol 'SPDY/3'"),
            (
                with_request("GET api/orders HTTP/1.1"),
                "target 'api/orders' is not a path",
            ),
            (format!("1.2.3.4 - - [{ts}] \"GET /a HTTP/1.1\""), "no status"),
            (
                format!("1.2.3.4 - - [{ts}] \"GET /a HTTP/1.1\" OK 1"),
                "invalid status 'OK'",
            ),
            (
                format!("1.2.3.4 - - [{ts}] \"GET /a HTTP/1.1\" 2000 1"),
                "invalid status '2000'",
            ),
        ];
        for (line, reason) in cases {
            let e = error(&line);
            assert!(e.contains(reason), "{line:?}: '{e}' does not say '{reason}'");
        }
    }

    #[test]
    fn no_input_panics_the_parser() {
        // Every prefix of a line, and every character replaced by a multibyte one.
        let mut inputs: Vec<String> = LINE.char_indices().map(|(i, _)| LINE[..i].to_string()).collect();
        for (i, c) in LINE.char_indices() {
            inputs.push(format!("{}é{}", &LINE[..i], &LINE[i + c.len_utf8()..]));
            inputs.push(format!("{}\"{}", &LINE[..i], &LINE[i + c.len_utf8()..]));
        }
        for input in inputs {
            let _ = parse_line(&input);
        }
    }

    #[test]
    fn generated_lines_parse_to_the_generators_records() {
        let (mut late, mut malformed) = (0, 0);
        for i in 0..20_000 {
            let g = generated(7, i);
            let parsed = parse_line(&line(7, i));
            match g.kind {
                Kind::Malformed(_) => {
                    malformed += 1;
                    assert!(parsed.is_err(), "line {i} should be malformed: {}", line(7, i));
                }
                kind => {
                    late += u64::from(kind == Kind::Late);
                    assert_eq!(
                        parsed,
                        Ok(hit(g.utc_secs * 1_000, g.method, g.endpoint, g.status)),
                        "line {i}: {}",
                        line(7, i)
                    );
                }
            }
        }
        assert!(late > 10 && malformed > 10, "{late} late, {malformed} malformed");
        let e = expected(20_000, 7);
        assert_eq!((e.late.len() as u64, e.malformed), (late, malformed));
        let paths: std::collections::BTreeSet<&str> = e.counts.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths.len(),
            ENDPOINTS
                .iter()
                .map(|e| e.1)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        );
        assert_eq!(e.counts.iter().map(|c| c.count).sum::<u64>() + late + malformed, 20_000);
    }

    #[test]
    fn csv_output_quotes_only_what_needs_it() {
        let c = |path: &str| {
            MinuteCount {
                minute_start: 1_699_999_980_000,
                path: path.into(),
                count: 3,
            }
            .to_string()
        };
        assert_eq!(c("/api/orders/{id}"), "2023-11-14T22:13:00Z,/api/orders/{id},3");
        assert_eq!(c("/a,b\"c"), "2023-11-14T22:13:00Z,\"/a,b\"\"c\",3");
        assert_eq!(
            hit(1_700_000_000_000, "GET", "/x", 200).to_string(),
            "2023-11-14T22:13:20Z,GET,/x,200"
        );
    }

    #[test]
    fn a_missing_input_is_an_error_naming_it() {
        let job = definition();
        let params = job
            .params_from_settings(&["input=/no/such/access.log".to_string()])
            .unwrap();
        let e = (job.build)(&params, &mut StreamEnv::new()).unwrap_err().to_string();
        assert!(e.contains("'/no/such/access.log' does not exist"), "{e}");
    }

    #[test]
    fn rejections_log_counts_at_powers_of_ten_and_restore_their_totals() {
        let mut r = Rejections::new("malformed line", "skipped", Some("lines"));
        for _ in 0..3 {
            r.accept();
        }
        r.reject("x");
        // Two old subtasks' counts restored into one (a rescale): they add up.
        let mut other = Rejections::new("malformed line", "skipped", Some("lines"));
        other.reject("y");
        let mut operator = r.state().unwrap();
        let entries = &mut operator.get_mut("malformed line").unwrap().entries;
        entries.extend(other.state().unwrap().remove("malformed line").unwrap().entries);
        let restored = RestoredState {
            keyed: Default::default(),
            operator,
        };
        let mut again = Rejections::new("malformed line", "skipped", Some("lines"));
        let info = sluice_runtime::TaskInfo {
            job_id: "j".into(),
            name: "parse-log".into(),
            uid: "parse-log".into(),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 128,
            attempt: 1,
            state_backend: sluice_runtime::config::StateBackendKind::Memory,
            local_dir: std::env::temp_dir(),
            rocksdb: Default::default(),
            finish_hooks: Default::default(),
        };
        again.open(&info, Some(&restored)).unwrap();
        assert_eq!((again.seen, again.rejected), (5, 2));
    }
}
