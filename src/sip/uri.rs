//! Just enough SIP URI reading for routing decisions (RFC 3261 §19.1): the host, port,
//! `transport` and `lr` of a Request-URI or a Route/Record-Route element, and the `tag`
//! of a From/To value. Views over the original bytes; nothing is re-serialised, because the
//! proxy forwards URIs exactly as received.

use std::net::{IpAddr, SocketAddr};

use crate::config::Transport;

/// The routing-relevant parts of a `sip:`/`sips:` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriTarget<'a> {
    pub user: Option<&'a str>,
    pub host: &'a str,
    pub port: Option<u16>,
    /// The `transport=` parameter (`None` when absent or not one we speak).
    pub transport: Option<Transport>,
    /// `;lr` present: the element is a loose router (RFC 3261 §16.4).
    pub lr: bool,
    /// `sips:` scheme.
    pub secure: bool,
}

impl UriTarget<'_> {
    /// The host as an IP address, when it is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        let host = self
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(self.host);
        host.parse().ok()
    }

    /// The socket address to send to, when the host is an IP literal (default port 5060).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.ip()?, self.port.unwrap_or(5060)))
    }
}

/// The URI inside a name-addr (`"Bob" <sip:b@h>;tag=1` → `sip:b@h`) or an addr-spec as is
/// (an addr-spec's header params start at the first `;` after the URI's own params, which we
/// cannot tell apart, so for addr-spec the whole value up to `,`/space is taken).
pub fn uri_of(value: &str) -> &str {
    let value = value.trim();
    if let Some(open) = find_unquoted(value, '<') {
        let rest = &value[open + 1..];
        return match rest.find('>') {
            Some(close) => &rest[..close],
            None => rest,
        };
    }
    value.split([' ', '\t', ',']).next().unwrap_or(value)
}

/// Position of `needle` outside double quotes.
fn find_unquoted(s: &str, needle: char) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == needle && !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// Reads a `sip:`/`sips:` URI (bare, or inside a name-addr). `None` for other schemes
/// (`tel:`) and for anything malformed.
pub fn parse_target(value: &str) -> Option<UriTarget<'_>> {
    let uri = uri_of(value);
    let (secure, rest) = if let Some(r) = strip_prefix_ci(uri, "sips:") {
        (true, r)
    } else {
        (false, strip_prefix_ci(uri, "sip:")?)
    };
    // headers (`?`) are not part of routing
    let rest = rest.split('?').next().unwrap_or(rest);
    let (userinfo, hostpart) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let user = userinfo.map(|u| u.split([':', ';']).next().unwrap_or(u));
    let mut parts = hostpart.split(';');
    let hostport = parts.next()?;
    let (host, port) = split_hostport(hostport)?;
    let mut transport = None;
    let mut lr = false;
    for param in parts {
        let (name, val) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (param.trim(), None),
        };
        if name.eq_ignore_ascii_case("lr") {
            lr = true;
        } else if name.eq_ignore_ascii_case("transport") {
            transport = match val {
                Some(v) if v.eq_ignore_ascii_case("udp") => Some(Transport::Udp),
                Some(v) if v.eq_ignore_ascii_case("tcp") => Some(Transport::Tcp),
                Some(v) if v.eq_ignore_ascii_case("tls") => Some(Transport::Tls),
                _ => None,
            };
        }
    }
    Some(UriTarget {
        user,
        host,
        port,
        transport,
        lr,
        secure,
    })
}

/// `host[:port]`, with `[v6]` brackets kept on the host.
pub fn split_hostport(hostport: &str) -> Option<(&str, Option<u16>)> {
    let hostport = hostport.trim();
    if hostport.is_empty() {
        return None;
    }
    if hostport.starts_with('[') {
        let close = hostport.find(']')?;
        let host = &hostport[..=close];
        let rest = &hostport[close + 1..];
        let port = match rest.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if rest.is_empty() => None,
            None => return None,
        };
        return Some((host, port));
    }
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host, Some(port.parse().ok()?))),
        Some(_) => None,
        None => Some((hostport, None)),
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// The `tag` parameter of a From/To value (outside the `<...>` URI).
pub fn tag_of(value: &str) -> Option<&str> {
    let params = match find_unquoted(value, '<') {
        Some(open) => {
            let after = &value[open..];
            &after[after.find('>')? + 1..]
        }
        // addr-spec form: params follow the URI; a URI param named tag is not expected
        None => value,
    };
    params.split(';').skip(1).find_map(|p| {
        let (name, val) = p.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("tag")
            .then(|| val.trim())
            .filter(|v| !v.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_element_with_lr_and_transport() {
        let t = parse_target("<sip:127.0.0.1:5060;transport=tcp;lr>").unwrap();
        assert_eq!(t.host, "127.0.0.1");
        assert_eq!(t.port, Some(5060));
        assert_eq!(t.transport, Some(Transport::Tcp));
        assert!(t.lr);
        assert_eq!(t.socket_addr(), Some("127.0.0.1:5060".parse().unwrap()));
    }

    #[test]
    fn request_uri_with_user_and_ipv6() {
        let t = parse_target("sip:+15550100@[::1]:5070;user=phone").unwrap();
        assert_eq!(t.user, Some("+15550100"));
        assert_eq!(t.host, "[::1]");
        assert_eq!(t.port, Some(5070));
        assert!(!t.lr);
        assert_eq!(t.socket_addr(), Some("[::1]:5070".parse().unwrap()));
    }

    #[test]
    fn name_addr_with_display_name_holding_brackets() {
        let t = parse_target("\"a <b>\" <sips:bob@example.com>;tag=9").unwrap();
        assert!(t.secure);
        assert_eq!(t.host, "example.com");
        assert_eq!(t.port, None);
        assert_eq!(t.ip(), None);
    }

    #[test]
    fn other_schemes_and_garbage_are_none() {
        assert!(parse_target("tel:+14155550123").is_none());
        assert!(parse_target("sip:").is_none());
        assert!(parse_target("sip:host:notaport").is_none());
        assert!(parse_target("<sip:[::1>").is_none());
    }

    #[test]
    fn tags() {
        assert_eq!(tag_of("<sip:a@b;tag=uri>;tag=abc"), Some("abc"));
        assert_eq!(tag_of("\"x;tag=no\" <sip:a@b>"), None);
        assert_eq!(tag_of("sip:a@b;tag=77"), Some("77"));
        assert_eq!(tag_of("<sip:a@b>"), None);
    }
}
