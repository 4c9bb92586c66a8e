//! Which agent a call is for, who is calling (DESIGN.md "Which agent", "Who calls"), and
//! where a settled call goes ([`Agents::route`]: the agent's routing rules, resolved to
//! upstreams and an injection config). Pure: takes header values and contexts, returns
//! decisions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use phonenumber::country::Id as Region;

use crate::config::{AgentConfig, CallerSource, Config, RouteConfig, RouteTarget, Upstream};
use crate::number::{normalise_lenient, uri_user, E164};
use crate::route::{CompiledRoutes, RouteInput};

/// Agents indexed by called number, with their routing rules compiled, built once per
/// config.
#[derive(Debug, Clone)]
pub struct Agents {
    pub config: Arc<Config>,
    /// One per agent, same index as `config.agents`. Shared, since compiled CEL programs
    /// cannot be cloned.
    routes: Arc<[CompiledRoutes]>,
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
        // Config validation compiles every rule already; a hand-built config with a broken
        // one gets a rule that never matches (logged by CompiledRoutes::new).
        let routes = config
            .agents
            .iter()
            .map(|agent| CompiledRoutes::new(&agent.routes))
            .collect();
        Agents {
            config,
            routes,
            by_number,
            default_agent,
            regions,
        }
    }

    /// Index of the agent `id` in `config.agents`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.config.agents.iter().position(|a| a.id == id)
    }

    /// The compiled routing rules of the agent at `agent_index`.
    pub fn routes(&self, agent_index: usize) -> Option<&CompiledRoutes> {
        self.routes.get(agent_index)
    }

    /// Evaluates the routing rules of the agent at `agent_index` against a settled call
    /// and resolves the first match to where the call goes and how its context is
    /// delivered. Call once per call, when the context is settled (hit, waited,
    /// looked-up, fallback); log and count [`Routing::errors`] (rules whose expression
    /// failed: they did not match).
    ///
    /// Rules are evaluated for the agent the call came in for only: an `agent = ...`
    /// hand-over takes that agent's upstreams and injection, not its rules (no chains,
    /// no loops).
    pub fn route(&self, agent_index: usize, input: &RouteInput<'_>) -> Routing<'_> {
        let (Some(agent), Some(routes)) = (
            self.config.agents.get(agent_index),
            self.routes.get(agent_index),
        ) else {
            return Routing::default();
        };
        let outcome = routes.first_match(input);
        let mut errors = outcome.errors;
        let decision = outcome.matched.and_then(|index| {
            let route = agent.routes.get(index)?;
            let (target_agent, upstreams) = match &route.target {
                RouteTarget::Stay => (agent, agent.upstreams.as_slice()),
                RouteTarget::Upstreams(upstreams) => (agent, upstreams.as_slice()),
                RouteTarget::Agent(id) => match self.by_id(id) {
                    Some(other) => (other, other.upstreams.as_slice()),
                    // Config validation rejects this; stay rather than drop the call.
                    None => {
                        errors.push((index, format!("hand-over agent {id:?} does not exist")));
                        (agent, agent.upstreams.as_slice())
                    }
                },
            };
            Some(RouteDecision {
                index,
                label: route.label(index),
                route,
                agent: target_agent,
                upstreams,
            })
        });
        Routing { decision, errors }
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
            // Fast path: carriers usually send the number exactly as configured (E.164),
            // and normalising is idempotent on its own output, so an exact match is the
            // answer the slow path would give, without running phonenumber's regexes.
            if let Some(&index) = self.by_number.get(user) {
                return Some(index);
            }
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

/// The result of [`Agents::route`].
#[derive(Debug, Default)]
pub struct Routing<'a> {
    /// The matching rule resolved; `None`: no rule matched, the call goes to its agent's
    /// own upstreams with its own injection, and carries no `X-Precall-Route`.
    pub decision: Option<RouteDecision<'a>>,
    /// `(rule index, error)` for rules whose expression failed (they did not match), and
    /// a hand-over to an agent that does not exist. Log and count each.
    pub errors: Vec<(usize, String)>,
}

/// Where a matched rule sends the call.
#[derive(Debug, Clone)]
pub struct RouteDecision<'a> {
    /// The rule's index in the call's agent's `routes`.
    pub index: usize,
    /// The `X-Precall-Route` value: the rule's name, else its index.
    pub label: String,
    /// The rule itself (its `set` fields go over the context: see
    /// [`crate::inject::apply_set`]).
    pub route: &'a RouteConfig,
    /// The agent whose injection (`inject`) applies: the hand-over agent for
    /// `agent = ...`, else the call's own agent.
    pub agent: &'a AgentConfig,
    /// Where to send the call, tried in order (never empty for a validated config).
    pub upstreams: &'a [Upstream],
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
        HttpConfig, InjectConfig, ListenAddr, SipConfig, StoreConfig, Transport, Upstream,
    };
    use serde_json::{json, Map, Value};
    use std::net::SocketAddr;
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
                ..SipConfig::default()
            },
            http: HttpConfig {
                rate_limit: None,
                ..HttpConfig::default()
            },
            store: StoreConfig::default(),
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

    fn upstream(port: u16) -> Upstream {
        Upstream {
            uri: format!("sip:127.0.0.1:{port}"),
            transport: Transport::Udp,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn rule(name: Option<&str>, when: &str, target: RouteTarget, set: Value) -> RouteConfig {
        RouteConfig {
            name: name.map(str::to_string),
            when: when.to_string(),
            target,
            set: match set {
                Value::Object(m) => m,
                _ => Map::new(),
            },
        }
    }

    fn routed_agents() -> Agents {
        let mut support = agent("support", &["+15550100"], Region::US);
        support.routes = vec![
            rule(
                Some("fraud"),
                "risk_score >= 80 || flagged == true",
                RouteTarget::Upstreams(vec![upstream(5090), upstream(5091)]),
                json!({"flow": "verification"}),
            ),
            rule(
                None,
                "lead_source != '' && int(budget) >= 5000",
                RouteTarget::Agent("sales".into()),
                json!({}),
            ),
            rule(
                None,
                "status == 'fallback'",
                RouteTarget::Stay,
                json!({"note": "x"}),
            ),
        ];
        let mut sales = agent("sales", &["+15550200"], Region::US);
        sales.upstreams = vec![upstream(5080)];
        sales.inject.prefix = "X-Sales-".into();
        // The sales agent's own rules are not consulted on a hand-over.
        sales.routes = vec![rule(
            None,
            "true",
            RouteTarget::Agent("support".into()),
            json!({}),
        )];
        Agents::new(config(vec![support, sales], None))
    }

    fn input<'a>(ctx: &'a Map<String, Value>, status: &'a str) -> RouteInput<'a> {
        RouteInput {
            context: ctx,
            caller: "+14155550123",
            called: "+15550100",
            agent: "support",
            status,
        }
    }

    fn ctx(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn index_of_and_routes() {
        let agents = routed_agents();
        assert_eq!(agents.index_of("support"), Some(0));
        assert_eq!(agents.index_of("sales"), Some(1));
        assert_eq!(agents.index_of("nobody"), None);
        assert_eq!(agents.routes(0).map(CompiledRoutes::len), Some(3));
        assert_eq!(agents.routes(1).map(CompiledRoutes::len), Some(1));
        assert!(agents.routes(2).is_none());
        // Still Clone + Debug, and shareable across tasks.
        let copy = agents.clone();
        assert!(format!("{copy:?}").contains("CompiledRoutes"));
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<Agents>();
    }

    #[test]
    fn route_to_upstreams_with_set() {
        let agents = routed_agents();
        let c = ctx(json!({"risk_score": 92}));
        let routing = agents.route(0, &input(&c, "hit"));
        assert!(routing.errors.is_empty(), "{:?}", routing.errors);
        let d = routing.decision.unwrap();
        assert_eq!((d.index, d.label.as_str()), (0, "fraud"));
        assert_eq!(d.agent.id, "support");
        let ports: Vec<u16> = d.upstreams.iter().map(|u| u.addr.port()).collect();
        assert_eq!(ports, [5090, 5091]);
        assert_eq!(d.route.set.get("flow"), Some(&json!("verification")));
    }

    #[test]
    fn route_hand_over_takes_the_other_agents_upstreams_and_injection() {
        let agents = routed_agents();
        let c = ctx(json!({"lead_source": "ads", "budget": "10000"}));
        let routing = agents.route(0, &input(&c, "waited"));
        // Rule 0 fails (no risk_score, no flagged) and is reported; rule 1 matches.
        assert_eq!(routing.errors.len(), 1);
        assert_eq!(routing.errors[0].0, 0);
        let d = routing.decision.unwrap();
        assert_eq!((d.index, d.label.as_str()), (1, "1"));
        assert_eq!(d.agent.id, "sales");
        assert_eq!(d.agent.inject.prefix, "X-Sales-");
        assert_eq!(d.upstreams[0].addr.port(), 5080);
    }

    #[test]
    fn route_stay_and_no_match() {
        let agents = routed_agents();
        let c = ctx(json!({"risk_score": 1, "flagged": false, "lead_source": ""}));
        let d = agents.route(0, &input(&c, "fallback")).decision.unwrap();
        assert_eq!(d.index, 2);
        assert_eq!(d.agent.id, "support");
        assert_eq!(d.upstreams[0].addr.port(), 5070);
        let routing = agents.route(0, &input(&c, "hit"));
        assert!(routing.decision.is_none());
        assert!(routing.errors.is_empty(), "{:?}", routing.errors);
        // No such agent: nothing, quietly.
        let routing = agents.route(9, &input(&c, "hit"));
        assert!(routing.decision.is_none() && routing.errors.is_empty());
    }

    #[test]
    fn hand_over_to_a_missing_agent_stays_and_says_so() {
        let mut a = agent("a", &[], Region::US);
        a.routes = vec![rule(
            None,
            "true",
            RouteTarget::Agent("ghost".into()),
            json!({}),
        )];
        let agents = Agents::new(config(vec![a], None));
        let c = Map::new();
        let routing = agents.route(0, &input(&c, "hit"));
        let d = routing.decision.unwrap();
        assert_eq!(d.agent.id, "a");
        assert_eq!(
            routing.errors,
            [(0, "hand-over agent \"ghost\" does not exist".to_string())]
        );
    }

    #[test]
    fn a_rule_that_does_not_compile_never_matches() {
        let mut a = agent("a", &[], Region::US);
        a.routes = vec![
            rule(None, "(", RouteTarget::Stay, json!({})),
            rule(Some("ok"), "true", RouteTarget::Stay, json!({})),
        ];
        let agents = Agents::new(config(vec![a], None));
        let c = Map::new();
        let routing = agents.route(0, &input(&c, "hit"));
        assert_eq!(routing.decision.unwrap().label, "ok");
        assert_eq!(routing.errors.len(), 1);
    }
}

#[cfg(test)]
mod fast_path_tests {
    use crate::config::Config;
    use crate::number::normalise;

    /// The exact-match fast path in `for_called` relies on normalisation being idempotent
    /// on the numbers a config stores.
    #[test]
    fn normalising_a_stored_number_gives_it_back() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/examples/seed.toml"
        ))
        .unwrap();
        let cfg = Config::from_toml_str(&text).unwrap();
        let mut numbers: Vec<(String, phonenumber::country::Id)> = cfg
            .agents
            .iter()
            .flat_map(|a| a.numbers.iter().map(move |n| (n.clone(), a.default_region)))
            .collect();
        for raw in [
            "+44 20 7946 0958",
            "+1 (415) 555-0123",
            "+33 1 23 45 67 89",
            "+15550100",
            "+999123456",
        ] {
            numbers.push((
                normalise(raw, phonenumber::country::Id::US).unwrap().0,
                phonenumber::country::Id::US,
            ));
        }
        for (n, region) in numbers {
            assert_eq!(
                normalise(&n, region).unwrap().0,
                n,
                "not idempotent for {n}"
            );
            assert_eq!(
                normalise(&n, phonenumber::country::Id::GB).unwrap().0,
                n,
                "region-independent for {n}"
            );
        }
    }
}
