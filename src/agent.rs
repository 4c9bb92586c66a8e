//! Which agent a call is for and who is calling (DESIGN.md "Which agent", "Who calls").
//! Pure: takes header values as strings, returns decisions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use phonenumber::country::Id as Region;

use crate::config::{AgentConfig, CallerSource, Config};
use crate::number::{normalise_lenient, uri_user, E164};

/// Agents indexed by called number, built once per config.
#[derive(Debug, Clone)]
pub struct Agents {
    pub config: Arc<Config>,
    /// normalised called number → index in `config.agents` (first agent listing it wins).
    by_number: HashMap<String, usize>,
    default_agent: Option<usize>,
    /// The agents' `default_region`s, first appearance first, without repeats: the
    /// regions a national-format called number is read in.
    regions: Vec<Region>,
}

impl Agents {
    /// Indexes the agents' (already normalised) numbers. A `sip.default_agent` naming no
    /// agent (which config validation rejects) is ignored.
    pub fn new(config: Arc<Config>) -> Agents {
        let mut by_number = HashMap::new();
        let mut regions = Vec::new();
        for (index, agent) in config.agents.iter().enumerate() {
            for number in &agent.numbers {
                by_number.entry(number.clone()).or_insert(index);
            }
            if !regions.contains(&agent.default_region) {
                regions.push(agent.default_region);
            }
        }
        let default_agent = config
            .sip
            .default_agent
            .as_deref()
            .and_then(|id| config.agents.iter().position(|a| a.id == id));
        Agents {
            config,
            by_number,
            default_agent,
            regions,
        }
    }

    pub fn by_id(&self, id: &str) -> Option<&AgentConfig> {
        self.config.agent(id)
    }

    /// The agent for a called user part (Request-URI user, else To user): the first agent
    /// listing the normalised number, else `sip.default_agent`, else `None` (→ 404).
    ///
    /// The config's numbers are normalised with their agent's region, and a called user
    /// may be national (`5550100`): it is read in each agent's region in agent order, and
    /// the first reading some agent lists wins. A `+` number reads the same in every
    /// region, so it is looked up once. User parameters (`+1555;npdi`) are ignored, and a
    /// whole URI is accepted too.
    pub fn for_called(&self, called_user: Option<&str>) -> Option<&AgentConfig> {
        let found = called_user.and_then(|user| {
            let user = if user.contains([':', '<']) {
                uri_user(user)?
            } else {
                user.split(';').next().unwrap_or(user)
            };
            let is_international = user.trim_start().starts_with('+');
            for &region in &self.regions {
                let number = normalise_lenient(user, region)?;
                if let Some(&index) = self.by_number.get(number.as_str()) {
                    return Some(index);
                }
                if is_international {
                    break;
                }
            }
            None
        });
        found
            .or(self.default_agent)
            .and_then(|index| self.config.agents.get(index))
    }
}

/// The caller's number from the agent's `caller_sources`, in order: P-Asserted-Identity
/// only when `peer_trusted`; normalised with the agent's region (digits only where that
/// fails). `None` when no source yields digits.
///
/// `pai` and `from` are header values (`"Alice" <sip:+1415…@host>;tag=x`); for a
/// P-Asserted-Identity listing several URIs the first one counts. A source whose user part
/// has no digits (`anonymous`) falls through to the next.
pub fn caller_number(
    sources: &[CallerSource],
    pai: Option<&str>,
    from: Option<&str>,
    peer_trusted: bool,
    region: Region,
) -> Option<E164> {
    sources.iter().find_map(|source| {
        let value = match source {
            // RFC 3325 §5: the identity is only as good as the peer that asserts it.
            CallerSource::Pai if peer_trusted => pai,
            CallerSource::Pai => None,
            CallerSource::From => from,
        }?;
        normalise_lenient(uri_user(value)?, region)
    })
}

/// Whether `ip` is within `sip.trusted_peers`.
pub fn is_trusted(config: &Config, ip: IpAddr) -> bool {
    config.sip.trusted_peers.iter().any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        HttpConfig, InjectConfig, ListenAddr, SipConfig, StoreBackend, StoreConfig, Transport,
        Upstream,
    };
    use serde_json::Map;
    use std::time::Duration;

    fn agent(id: &str, numbers: &[&str], region: Region) -> AgentConfig {
        AgentConfig {
            id: id.into(),
            api_keys: vec![format!("key-{id}")],
            numbers: numbers.iter().map(|n| n.to_string()).collect(),
            upstreams: vec![Upstream {
                uri: "sip:127.0.0.1:5070".into(),
                transport: Transport::Udp,
                addr: "127.0.0.1:5070".parse().unwrap(),
            }],
            upstream_timeout: Duration::from_millis(2000),
            health_check: None,
            lookup: None,
            routes: Vec::new(),
            default_region: region,
            fallback_wait: Duration::from_millis(2000),
            defaults: Map::new(),
            inject: InjectConfig::default(),
            caller_sources: vec![CallerSource::Pai, CallerSource::From],
            webhook_secret: None,
        }
    }

    fn config(agents: Vec<AgentConfig>, default_agent: Option<&str>) -> Arc<Config> {
        Arc::new(Config {
            sip: SipConfig {
                listen: vec![ListenAddr {
                    transport: Transport::Udp,
                    addr: "127.0.0.1:5060".parse().unwrap(),
                }],
                trusted_peers: vec!["10.0.0.0/8".parse().unwrap()],
                default_agent: default_agent.map(str::to_string),
                caller_sources: vec![CallerSource::Pai, CallerSource::From],
                record_route: true,
                t1: Duration::from_millis(500),
                max_message_bytes: 65535,
                limits: Default::default(),
            },
            http: HttpConfig {
                listen: "127.0.0.1:8080".parse().unwrap(),
                max_body_bytes: 16384,
                rate_limit: None,
            },
            store: StoreConfig {
                backend: StoreBackend::Memory,
                ttl: Duration::from_secs(300),
                consume: true,
                max_contexts: 1_000_000,
            },
            agents,
        })
    }

    fn called(agents: &Agents, user: Option<&str>) -> Option<String> {
        agents.for_called(user).map(|a| a.id.clone())
    }

    #[test]
    fn called_number_in_any_notation_finds_its_agent() {
        let agents = Agents::new(config(
            vec![
                agent("a", &["+15550100"], Region::US),
                agent("b", &["+442079460958", "1000"], Region::GB),
            ],
            None,
        ));
        for user in [
            "+15550100",
            "15550100",
            "5550100",
            "+1-555-0100",
            "+15550100;npdi",
        ] {
            assert_eq!(
                called(&agents, Some(user)).as_deref(),
                Some("a"),
                "{user:?}"
            );
        }
        // National in GB: read in the second agent's region.
        assert_eq!(called(&agents, Some("02079460958")).as_deref(), Some("b"));
        assert_eq!(called(&agents, Some("+442079460958")).as_deref(), Some("b"));
        assert_eq!(called(&agents, Some("1000")).as_deref(), Some("b"));
        assert_eq!(
            called(&agents, Some("sip:+15550100@h")).as_deref(),
            Some("a")
        );
        assert_eq!(called(&agents, Some("+15550199")), None);
        assert_eq!(called(&agents, Some("service")), None);
        assert_eq!(called(&agents, None), None);
    }

    #[test]
    fn first_agent_listing_a_number_wins() {
        let agents = Agents::new(config(
            vec![
                agent("first", &["+15550100"], Region::US),
                agent("second", &["+15550100", "+15550101"], Region::US),
            ],
            None,
        ));
        assert_eq!(called(&agents, Some("+15550100")).as_deref(), Some("first"));
        assert_eq!(
            called(&agents, Some("+15550101")).as_deref(),
            Some("second")
        );
    }

    #[test]
    fn default_agent_catches_the_rest() {
        let agents = Agents::new(config(
            vec![
                agent("a", &["+15550100"], Region::US),
                agent("fallback", &[], Region::US),
            ],
            Some("fallback"),
        ));
        assert_eq!(called(&agents, Some("+15550100")).as_deref(), Some("a"));
        assert_eq!(
            called(&agents, Some("+15550199")).as_deref(),
            Some("fallback")
        );
        assert_eq!(
            called(&agents, Some("service")).as_deref(),
            Some("fallback")
        );
        assert_eq!(called(&agents, None).as_deref(), Some("fallback"));
        assert_eq!(agents.by_id("a").map(|a| a.id.as_str()), Some("a"));
        assert!(agents.by_id("nobody").is_none());
        // A default naming nobody is ignored rather than trusted.
        let agents = Agents::new(config(vec![agent("a", &[], Region::US)], Some("z")));
        assert_eq!(called(&agents, Some("+1")), None);
    }

    const PAI: &str = "<sip:+14155550123@carrier.example;user=phone>";
    const FROM: &str = "\"Bob\" <sip:+1-650-555-0199@carrier.example>;tag=1928301774";

    #[test]
    fn pai_only_from_trusted_peers() {
        let both = [CallerSource::Pai, CallerSource::From];
        let caller =
            |trusted| caller_number(&both, Some(PAI), Some(FROM), trusted, Region::US).map(|n| n.0);
        assert_eq!(caller(true).as_deref(), Some("+14155550123"));
        assert_eq!(caller(false).as_deref(), Some("+16505550199"));
    }

    #[test]
    fn sources_in_order_and_fall_through() {
        use CallerSource::{From, Pai};
        let got = |sources: &[CallerSource], pai: Option<&str>, from: Option<&str>| {
            caller_number(sources, pai, from, true, Region::US).map(|n| n.0)
        };
        assert_eq!(
            got(&[From, Pai], Some(PAI), Some(FROM)).as_deref(),
            Some("+16505550199")
        );
        assert_eq!(got(&[Pai], None, Some(FROM)), None);
        assert_eq!(
            got(&[Pai, From], None, Some(FROM)).as_deref(),
            Some("+16505550199")
        );
        let anonymous = "\"Anonymous\" <sip:anonymous@anonymous.invalid>;tag=1";
        assert_eq!(
            got(&[Pai, From], Some(anonymous), Some(FROM)).as_deref(),
            Some("+16505550199")
        );
        assert_eq!(got(&[From], None, Some(anonymous)), None);
        assert_eq!(got(&[], Some(PAI), Some(FROM)), None);
        // tel: URIs, national numbers with the region, digits where phonenumber gives up.
        assert_eq!(
            got(&[From], None, Some("<tel:650-555-0199>;tag=x")).as_deref(),
            Some("+16505550199")
        );
        assert_eq!(
            got(&[From], None, Some("<sip:*1234@pbx>")).as_deref(),
            Some("1234")
        );
        assert_eq!(
            got(&[From], None, Some("sip:sipp@127.0.0.1:5061;tag=1")),
            None
        );
    }

    #[test]
    fn trusted_peers() {
        let cfg = config(vec![], None);
        assert!(is_trusted(&cfg, "10.1.2.3".parse().unwrap()));
        assert!(!is_trusted(&cfg, "192.0.2.1".parse().unwrap()));
    }
}
