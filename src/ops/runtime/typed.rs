//! HAProxy's `typed` and `json` output formats for `show stat` and `show
//! info`: every value with its position, name and tags (origin, nature,
//! scope) and its type, as HAProxy 2.6 prints them. The tags are HAProxy's
//! own; values pointsman leaves empty in the CSV are left out, as HAProxy
//! leaves out the fields it has no value for.

use std::fmt::Write as _;

use super::show::{StatLine, STAT_FIELDS};

/// `show stat`'s tags and types by column (HAProxy 2.6's).
const STAT_TAGS: [&str; 128] = [
    "KNS:str", "KNS:str", "MGP:u32", "MMP:u32", "MGP:u32", "MMP:u32", "CLP:u32", "MCP:u64",
    "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64",
    "MCP:u64", "SGP:str", "MaP:u32", "SGP:u32", "SGP:u32", "MCP:u64", "MCP:u64", "MAP:u32",
    "MCP:u32", "MGP:u32", "KGP:u32", "KGS:u32", "KGS:u32", "MGP:u32", "MCP:u64", "MGP:u32",
    "CGS:u32", "MRP:u32", "CLP:u32", "MMP:u32", "MOP:str", "MGP:u32", "MDP:u64", "MCP:u64",
    "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MGP:u32", "MRP:u32", "MMP:u32",
    "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MAP:s32",
    "MOP:str", "MOS:str", "MaP:u32", "MaP:u32", "MaP:u32", "MaP:u32", "MGP:u32", "MGP:u32",
    "MGP:u32", "MOP:str", "MGP:u32", "CGS:u32", "CGS:u32", "CGS:u32", "MGP:u32", "MOS:str",
    "MOS:str", "CGS:str", "MOS:str", "CGS:str", "CGS:str", "MRP:u32", "MMP:u32", "MCP:u64",
    "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64",
    "MGP:u32", "MGP:u32", "MMP:u32", "MMP:u32", "MMP:u32", "MMP:u32", "MCP:u64", "MGP:u32",
    "MGP:u32", "MGP:u32", "MGP:u32", "MaP:u32", "MGP:u32", "MGP:u32", "MGP:u32", "MCP:u64",
    "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64",
    "MCP:u64", "MCP:u64", "MCP:u64", "MGP:u64", "MGP:u64", "MCP:u64", "MCP:u64", "MGP:u64",
    "MGP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MCP:u64", "MGP:u32",
];

/// `show info`'s tags and types by position (HAProxy 2.6's).
const INFO_TAGS: &[(usize, &str)] = &[
    (0, "POS:str"),
    (1, "POS:str"),
    (2, "POS:str"),
    (3, "CGS:u32"),
    (4, "CGS:u32"),
    (5, "KGP:u32"),
    (6, "SGP:u32"),
    (7, "MDP:str"),
    (8, "MDP:u32"),
    (9, "CLP:u32"),
    (10, "MGP:u32"),
    (11, "MGP:u32"),
    (12, "MCP:u32"),
    (13, "CLP:u32"),
    (14, "CLP:u32"),
    (15, "CLP:u32"),
    (16, "CLP:u32"),
    (17, "MGP:u32"),
    (18, "MCP:u32"),
    (19, "MCP:u32"),
    (20, "MMP:u32"),
    (21, "MGP:u32"),
    (22, "MCP:u32"),
    (23, "CLP:u32"),
    (24, "MGP:u32"),
    (25, "MGP:u32"),
    (26, "MRP:u32"),
    (27, "CLP:u32"),
    (28, "MMP:u32"),
    (29, "MRP:u32"),
    (30, "CLP:u32"),
    (31, "MRP:u32"),
    (32, "MRP:u32"),
    (33, "CLP:u32"),
    (34, "MMP:u32"),
    (35, "MGP:u32"),
    (36, "MMP:u32"),
    (37, "MGP:u32"),
    (38, "MRP:u32"),
    (39, "MMP:u32"),
    (40, "MCP:u32"),
    (41, "MCP:u32"),
    (42, "MRP:u32"),
    (43, "MRP:u32"),
    (44, "CLP:u32"),
    (47, "MGP:u32"),
    (48, "MGP:u32"),
    (49, "MaP:u32"),
    (50, "COS:str"),
    (51, "COS:str"),
    (52, "MGP:u32"),
    (53, "MGP:u32"),
    (54, "MGP:u32"),
    (55, "MGP:u32"),
    (56, "MGP:u32"),
    (57, "MGP:u32"),
    (58, "MGP:u32"),
    (59, "MGP:u32"),
    (60, "MGP:u32"),
    (61, "MGP:u64"),
    (62, "MGP:u64"),
    (63, "MRP:u64"),
    (64, "MGP:u32"),
    (65, "MCP:u32"),
    (66, "POS:str"),
    (67, "CLP:u32"),
    (68, "MGP:u64"),
    (69, "MGP:u64"),
    (70, "MDP:u32"),
    (71, "SGP:str"),
];

fn origin(c: char) -> &'static str {
    match c {
        'M' => "Metric",
        'S' => "Status",
        'K' => "Key",
        'C' => "Config",
        'P' => "Product",
        _ => "Unknown",
    }
}

fn nature(c: char) -> &'static str {
    match c {
        'G' => "Gauge",
        'L' => "Limit",
        'M' => "Max",
        'R' => "Rate",
        'C' => "Counter",
        'D' => "Duration",
        'A' => "Age",
        'T' => "Time",
        'N' => "Name",
        'O' => "Output",
        'a' => "Avg",
        _ => "Unknown",
    }
}

fn scope(c: char) -> &'static str {
    match c {
        'P' => "Process",
        'S' => "Service",
        's' => "System",
        _ => "Unknown",
    }
}

/// A field's tags and type: `("MGP", "u32")`; a value that is not a
/// number is a string whatever the column's usual type.
fn split_tags<'a>(tags: &'a str, value: &str) -> (&'a str, &'a str) {
    let (t, ty) = tags.split_once(':').unwrap_or(("MGP", "u64"));
    if ty != "str" && value.parse::<i64>().is_err() {
        (t, "str")
    } else {
        (t, ty)
    }
}

fn json_field(
    out: &mut serde_json::Map<String, serde_json::Value>,
    pos: usize,
    name: &str,
    tags: &str,
    ty: &str,
    value: &str,
) {
    let mut t = tags.chars();
    let (o, n, s) = (
        t.next().unwrap_or('?'),
        t.next().unwrap_or('?'),
        t.next().unwrap_or('?'),
    );
    let value = if ty == "str" {
        serde_json::Value::from(value)
    } else {
        value
            .parse::<i64>()
            .map_or_else(|_| serde_json::Value::from(value), serde_json::Value::from)
    };
    out.insert(
        "field".into(),
        serde_json::json!({ "pos": pos, "name": name }),
    );
    out.insert("processNum".into(), 1.into());
    out.insert(
        "tags".into(),
        serde_json::json!({ "origin": origin(o), "nature": nature(n), "scope": scope(s) }),
    );
    out.insert(
        "value".into(),
        serde_json::json!({ "type": ty, "value": value }),
    );
}

/// The filled columns of a row: (position, name, tags, type, value).
fn filled(
    l: &StatLine,
) -> impl Iterator<Item = (usize, &'static str, &'static str, &'static str, &str)> {
    STAT_FIELDS
        .iter()
        .enumerate()
        .filter(|(_, name)| **name != "-")
        .filter_map(move |(pos, name)| {
            let v = l.get(name);
            if v.is_empty() {
                return None;
            }
            let (tags, ty) = split_tags(STAT_TAGS[pos], v);
            Some((pos, *name, tags, ty, v))
        })
}

/// `show stat typed`: `F.<iid>.<sid>.<pos>.<name>.<process>:<tags>:<type>:<value>`.
pub fn stat_typed(lines: &[StatLine]) -> String {
    let mut out = String::new();
    for l in lines {
        for (pos, name, tags, ty, v) in filled(l) {
            let _ = writeln!(
                out,
                "{}.{}.{}.{pos}.{name}.1:{tags}:{ty}:{v}",
                l.kind_letter(),
                l.iid,
                l.sid
            );
        }
    }
    out
}

/// `show stat json`: an array of rows, each an array of fields.
pub fn stat_json(lines: &[StatLine]) -> String {
    let rows: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            let fields: Vec<serde_json::Value> = filled(l)
                .map(|(pos, name, tags, ty, v)| {
                    let mut m = serde_json::Map::new();
                    m.insert("objType".into(), l.kind_name().into());
                    m.insert("proxyId".into(), l.iid.into());
                    m.insert("id".into(), l.sid.into());
                    json_field(&mut m, pos, name, tags, ty, v);
                    serde_json::Value::Object(m)
                })
                .collect();
            serde_json::Value::Array(fields)
        })
        .collect();
    serde_json::Value::Array(rows).to_string() + "\n"
}

fn info_tags(pos: usize) -> &'static str {
    INFO_TAGS
        .iter()
        .find(|(p, _)| *p == pos)
        .map_or("MGP:u32", |(_, t)| t)
}

/// `show info typed`: `<pos>.<name>.<process>:<tags>:<type>:<value>`.
pub fn info_typed(fields: &[(usize, &'static str, String)]) -> String {
    let mut out = String::new();
    for (pos, name, v) in fields {
        let (tags, ty) = split_tags(info_tags(*pos), v);
        let _ = writeln!(out, "{pos}.{name}.1:{tags}:{ty}:{v}");
    }
    out
}

/// `show info json`: an array of fields.
pub fn info_json(fields: &[(usize, &'static str, String)]) -> String {
    let list: Vec<serde_json::Value> = fields
        .iter()
        .map(|(pos, name, v)| {
            let (tags, ty) = split_tags(info_tags(*pos), v);
            let mut m = serde_json::Map::new();
            json_field(&mut m, *pos, name, tags, ty, v);
            serde_json::Value::Object(m)
        })
        .collect();
    serde_json::Value::Array(list).to_string() + "\n"
}

/// A Unix time as (year, month, day, hour, minute, second), UTC.
pub fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(1_796_295_659), (2026, 12, 3, 11, 0, 59));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
    }

    #[test]
    fn tags_read_like_haproxy() {
        assert_eq!(STAT_FIELDS.len(), STAT_TAGS.len());
        assert_eq!(split_tags(STAT_TAGS[0], "web"), ("KNS", "str"));
        assert_eq!(split_tags("MGP:u32", "no check"), ("MGP", "str"));
        let typed = info_typed(&[(0, "Name", "HAProxy".into()), (19, "CumReq", "7".into())]);
        assert_eq!(typed, "0.Name.1:POS:str:HAProxy\n19.CumReq.1:MCP:u32:7\n");
    }
}
