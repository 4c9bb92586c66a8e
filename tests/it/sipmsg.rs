//! A deliberately small SIP reader for the tests: start line, header lines kept verbatim
//! (folded continuation lines joined), compact names understood, body by Content-Length.
//! It is independent of precall's own parser on purpose: the tests must not trust the code
//! they check.

/// One header field as received.
#[derive(Debug, Clone)]
pub struct Field {
    /// The name as written (`v`, `Via`, `X-Precall-Status`).
    pub name: String,
    /// The value, trimmed; folded lines joined with their line break kept out.
    pub value: String,
    /// The whole field as on the wire, without its final CRLF (folded lines included).
    pub line: String,
}

/// A parsed SIP message (request or response).
#[derive(Debug, Clone)]
pub struct SipMsg {
    pub raw: Vec<u8>,
    pub start_line: String,
    pub fields: Vec<Field>,
    pub body: Vec<u8>,
}

/// Long name for a compact form (RFC 3261 §7.3.3 and friends), lower case.
pub fn long_name(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    let long = match lower.as_str() {
        "v" => "via",
        "f" => "from",
        "t" => "to",
        "i" => "call-id",
        "m" => "contact",
        "l" => "content-length",
        "c" => "content-type",
        "k" => "supported",
        "s" => "subject",
        "e" => "content-encoding",
        "o" => "event",
        "r" => "refer-to",
        "b" => "referred-by",
        "u" => "allow-events",
        "x" => "session-expires",
        other => other,
    };
    long.to_string()
}

impl SipMsg {
    /// Parses one complete message; `None` when the head is not there.
    pub fn parse(raw: &[u8]) -> Option<SipMsg> {
        let start = raw.iter().position(|&b| b != b'\r' && b != b'\n')?;
        let raw_trim = &raw[start..];
        let head_end = find(raw_trim, b"\r\n\r\n")?;
        let head = std::str::from_utf8(&raw_trim[..head_end]).ok()?;
        let mut lines = head.split("\r\n");
        let start_line = lines.next()?.to_string();
        let mut fields: Vec<Field> = Vec::new();
        for line in lines {
            if line.starts_with(' ') || line.starts_with('\t') {
                let last = fields.last_mut()?;
                last.line.push_str("\r\n");
                last.line.push_str(line);
                last.value.push(' ');
                last.value.push_str(line.trim());
                continue;
            }
            let colon = line.find(':')?;
            fields.push(Field {
                name: line[..colon].trim().to_string(),
                value: line[colon + 1..].trim().to_string(),
                line: line.to_string(),
            });
        }
        let body_start = head_end + 4;
        let rest = &raw_trim[body_start..];
        let mut msg = SipMsg {
            raw: raw.to_vec(),
            start_line,
            fields,
            body: Vec::new(),
        };
        let len = match msg.header("content-length") {
            Some(v) => v.trim().parse::<usize>().ok()?.min(rest.len()),
            None => rest.len(),
        };
        msg.body = rest[..len].to_vec();
        Some(msg)
    }

    pub fn is_request(&self) -> bool {
        !self.start_line.starts_with("SIP/2.0 ")
    }

    /// The method of a request, `None` for a response.
    pub fn method(&self) -> Option<&str> {
        if self.is_request() {
            self.start_line.split(' ').next()
        } else {
            None
        }
    }

    pub fn request_uri(&self) -> Option<&str> {
        if self.is_request() {
            self.start_line.split(' ').nth(1)
        } else {
            None
        }
    }

    /// The status code of a response, `None` for a request.
    pub fn status(&self) -> Option<u16> {
        if self.is_request() {
            return None;
        }
        self.start_line.split(' ').nth(1)?.parse().ok()
    }

    /// All fields with this name (case-insensitive, compact forms mapped), in order.
    pub fn fields_named<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Field> + 'a {
        let want = long_name(name);
        self.fields
            .iter()
            .filter(move |f| long_name(&f.name) == want)
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.fields_named(name).next().map(|f| f.value.as_str())
    }

    /// Every value of a header, comma-joined values split (for Via, Route, Record-Route).
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.fields_named(name)
            .flat_map(|f| split_commas(&f.value))
            .collect()
    }

    pub fn call_id(&self) -> Option<&str> {
        self.header("call-id")
    }

    /// `CSeq` method (`INVITE` in `1 INVITE`).
    pub fn cseq_method(&self) -> Option<&str> {
        self.header("cseq")?.split_whitespace().nth(1)
    }

    /// The `branch` parameter of the topmost Via.
    pub fn top_branch(&self) -> Option<String> {
        let via = self.header_values("via").into_iter().next()?;
        param(&via, "branch")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

/// A `;name=value` parameter of a header value (outside `<...>`), case-insensitive name.
pub fn param(value: &str, name: &str) -> Option<String> {
    let after_uri = match value.rfind('>') {
        Some(i) => &value[i + 1..],
        None => value,
    };
    for p in after_uri
        .split(';')
        .skip(if value.contains('>') { 0 } else { 1 })
    {
        let mut kv = p.splitn(2, '=');
        let k = kv.next()?.trim();
        if k.eq_ignore_ascii_case(name) {
            return Some(kv.next().unwrap_or("").trim().to_string());
        }
    }
    None
}

/// Splits a header value at commas that are outside `<...>` and quotes.
pub fn split_commas(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth_angle = false;
    let mut quoted = false;
    let mut cur = String::new();
    for ch in value.chars() {
        match ch {
            '"' => quoted = !quoted,
            '<' if !quoted => depth_angle = true,
            '>' if !quoted => depth_angle = false,
            ',' if !quoted && !depth_angle => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Stream framing: length of the first complete message in `buf` (after leading CRLFs,
/// which are counted in), or `None` when more bytes are needed.
pub fn frame(buf: &[u8]) -> Option<usize> {
    let skip = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let head_end = find(&buf[skip..], b"\r\n\r\n")? + skip + 4;
    let head = String::from_utf8_lossy(&buf[skip..head_end]);
    let mut len = 0usize;
    for line in head.split("\r\n") {
        if let Some(colon) = line.find(':') {
            if long_name(&line[..colon]) == "content-length" {
                len = line[colon + 1..].trim().parse().unwrap_or(0);
            }
        }
    }
    if buf.len() >= head_end + len {
        Some(head_end + len)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_compact_folded_and_comma_joined_headers() {
        let raw = b"SIP/2.0 200 OK\r\nv: SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2\r\nVia: SIP/2.0/UDP c\r\nSubject: one\r\n two\r\ni: abc\r\nl: 3\r\n\r\nxyzEXTRA";
        let m = SipMsg::parse(raw).unwrap();
        assert_eq!(m.status(), Some(200));
        assert_eq!(m.header_values("via").len(), 3);
        assert_eq!(m.top_branch().as_deref(), Some("z9hG4bK1"));
        assert_eq!(m.header("subject"), Some("one two"));
        assert_eq!(m.call_id(), Some("abc"));
        assert_eq!(m.body, b"xyz");
        assert_eq!(frame(raw), Some(raw.len() - 5));
        assert_eq!(frame(&raw[..raw.len() - 7]), None);
    }

    #[test]
    fn params_outside_angle_brackets() {
        assert_eq!(param("<sip:a@b;lr>;tag=x1", "tag").as_deref(), Some("x1"));
        assert_eq!(param("<sip:a@b;lr>", "lr"), None);
        assert_eq!(
            param("SIP/2.0/UDP h:1;rport=5;branch=z9", "rport").as_deref(),
            Some("5")
        );
        assert_eq!(
            split_commas("<sip:a,b>, <sip:c>"),
            vec!["<sip:a,b>", "<sip:c>"]
        );
    }
}
