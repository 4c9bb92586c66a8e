use super::*;
use crate::config::RouteTarget;
use proptest::prelude::*;
use serde_json::json;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

fn rule(when: &str) -> RouteConfig {
    RouteConfig {
        name: None,
        when: when.to_string(),
        target: RouteTarget::Stay,
        set: Map::new(),
    }
}

fn routes(whens: &[&str]) -> CompiledRoutes {
    CompiledRoutes::compile(&whens.iter().map(|w| rule(w)).collect::<Vec<_>>())
        .unwrap_or_else(|e| panic!("{e}: {whens:?}"))
}

fn input<'a>(context: &'a Map<String, Value>, status: &'a str) -> RouteInput<'a> {
    RouteInput {
        context,
        caller: "+442079460958",
        called: "+15550100",
        agent: "support-agent",
        status,
    }
}

/// Evaluates one expression against `ctx` (status "hit"): `Ok(matched)` or the error.
fn eval(when: &str, ctx: Value) -> Result<bool, String> {
    let ctx = obj(ctx);
    let outcome = routes(&[when]).first_match(&input(&ctx, "hit"));
    match outcome.errors.as_slice() {
        [] => Ok(outcome.matched == Some(0)),
        [(0, error)] => Err(error.clone()),
        other => panic!("unexpected errors {other:?}"),
    }
}

#[test]
fn issue_examples() {
    let fraud = "risk_score >= 80 || flagged == true";
    assert_eq!(eval(fraud, json!({"risk_score": 92})), Ok(true));
    assert_eq!(eval(fraud, json!({"flagged": true})), Ok(true));
    assert_eq!(
        eval(fraud, json!({"risk_score": 10, "flagged": false})),
        Ok(false)
    );
    // Neither side decides: the missing field is the error.
    let err = eval(fraud, json!({"risk_score": 10})).unwrap_err();
    assert!(err.contains("\"flagged\""), "{err}");

    let lead = "lead_source != '' && int(budget) >= 5000";
    assert_eq!(
        eval(lead, json!({"lead_source": "ads", "budget": "10000"})),
        Ok(true)
    );
    assert_eq!(
        eval(lead, json!({"lead_source": "ads", "budget": 10000})),
        Ok(true)
    );
    assert_eq!(
        eval(lead, json!({"lead_source": "ads", "budget": "100"})),
        Ok(false)
    );
    assert_eq!(
        eval(lead, json!({"lead_source": "", "budget": "10000"})),
        Ok(false)
    );
    let err = eval(lead, json!({"lead_source": "ads", "budget": "lots"})).unwrap_err();
    assert!(!err.contains("lots"), "no context value in errors: {err}");

    let ctx = Map::new();
    let r = routes(&["status == 'fallback'"]);
    assert_eq!(r.first_match(&input(&ctx, "fallback")).matched, Some(0));
    assert_eq!(r.first_match(&input(&ctx, "hit")).matched, None);
    assert_eq!(eval("caller.startsWith('+44')", json!({})), Ok(true));
    assert_eq!(
        eval(
            "called == '+15550100' && agent == 'support-agent'",
            json!({})
        ),
        Ok(true)
    );
}

#[test]
fn first_true_rule_wins_and_errors_before_it_are_reported() {
    let ctx = obj(json!({"tier": "gold", "score": 50}));
    let r = routes(&[
        "missing_field == 1",
        "tier == 'silver'",
        "score > 'x'",
        "tier == 'gold'",
        "true",
    ]);
    let outcome = r.first_match(&input(&ctx, "hit"));
    assert_eq!(outcome.matched, Some(3));
    let failed: Vec<usize> = outcome.errors.iter().map(|(i, _)| *i).collect();
    assert_eq!(failed, [0, 2]);
    // No rule matches: every error is reported.
    let r = routes(&["nope", "tier == 'x'", "1 / 0 == 1"]);
    let outcome = r.first_match(&input(&ctx, "hit"));
    assert_eq!(outcome.matched, None);
    assert_eq!(outcome.errors.len(), 2);
    assert_eq!(outcome.errors[1].1, "division by zero");
    // No rules at all.
    let outcome = routes(&[]).first_match(&input(&ctx, "hit"));
    assert_eq!(outcome, RouteOutcome::default());
}

#[test]
fn non_bool_results_do_not_match() {
    assert_eq!(
        eval("score", json!({"score": 3})),
        Err("the expression gave int, not a bool".to_string())
    );
    assert!(eval("name", json!({"name": "Ada"})).is_err());
    assert!(eval("flag", json!({"flag": null})).is_err());
    assert_eq!(eval("flag", json!({"flag": true})), Ok(true));
}

#[test]
fn json_types_map_to_cel_types() {
    let ctx = json!({
        "i": 5, "neg": -5, "big": u64::MAX, "f": 1.5, "s": "x", "t": true, "n": null,
        "list": [1, "two", [3]], "map": {"k": {"deep": 7}}, "empty": {}
    });
    for expr in [
        "type(i) == int",
        "type(neg) == int",
        "type(big) == uint",
        "big == 18446744073709551615u",
        "type(f) == double",
        "f > 1.0",
        "type(s) == string",
        "type(t) == bool",
        "n == null",
        "size(list) == 3 && list[1] == 'two' && list[2][0] == 3",
        "map.k.deep == 7",
        "'k' in map",
        "size(empty) == 0",
        "list.exists(x, x == 1)",
    ] {
        assert_eq!(eval(expr, ctx.clone()), Ok(true), "{expr}");
    }
}

#[test]
fn builtins_win_and_ctx_reaches_every_field() {
    let ctx = json!({
        "status": "posted", "caller": "spoof", "ctx": "shadowed",
        "lead-source": "ads", "in": 1, "flagged": true
    });
    assert_eq!(eval("status == 'hit'", ctx.clone()), Ok(true));
    assert_eq!(eval("caller == '+442079460958'", ctx.clone()), Ok(true));
    assert_eq!(eval("ctx.status == 'posted'", ctx.clone()), Ok(true));
    assert_eq!(eval("ctx.caller == 'spoof'", ctx.clone()), Ok(true));
    assert_eq!(eval("ctx['lead-source'] == 'ads'", ctx.clone()), Ok(true));
    assert_eq!(eval("ctx['in'] == 1", ctx.clone()), Ok(true));
    assert_eq!(eval("has(ctx.flagged)", ctx.clone()), Ok(true));
    assert_eq!(eval("has(ctx.missing)", ctx.clone()), Ok(false));
    assert_eq!(
        eval("ctx.missing == 1", ctx.clone()),
        Err("no key \"missing\"".to_string())
    );
    assert_eq!(
        eval("has(ctx.missing) && missing == 1", ctx.clone()),
        Ok(false)
    );
    assert_eq!(eval("ctx.ctx == 'shadowed'", ctx), Ok(true));
}

#[test]
fn mixed_numeric_comparisons() {
    // CEL compares numbers across int, uint and double.
    assert_eq!(eval("score >= 80", json!({"score": 92.5})), Ok(true));
    assert_eq!(eval("score >= 80", json!({"score": u64::MAX})), Ok(true));
    assert_eq!(eval("score >= 80.0", json!({"score": 92})), Ok(true));
    // A string is not a number: an error, so no match.
    assert!(eval("score >= 80", json!({"score": "92"})).is_err());
}

#[test]
fn errors_hold_no_context_values() {
    let secret = "SECRET-VALUE-1234";
    let ctx = json!({"s": secret, "m": {"k": secret}, "l": [secret]});
    for expr in [
        "s > 1",
        "s + 1 == 2",
        "int(s) == 1",
        "m.nope == 1",
        "m[1] == 1",
        "m[s] == 1",
        "ctx[s] == 1",
        "l[5] == 1",
        "l['x'] == 1",
        "s.startsWith(1)",
        "s.endsWith(m)",
        "-s == 1",
        "double(s) > 1.0",
        "s.matches('[') ",
        "{s: 1, s: 2}.size() == 1",
        "s",
        "m",
        "s.size() + s == 1",
        "s.charAt(100) == ''",
    ] {
        let err = eval(expr, ctx.clone()).unwrap_err();
        assert!(!err.contains(secret), "{expr}: {err}");
        assert!(!err.contains('\n'), "{expr}: {err}");
    }
}

#[test]
fn compile_errors_are_one_line() {
    let err = compile("risk_score >=").unwrap_err();
    assert!(!err.contains('\n'), "{err}");
    assert!(!err.is_empty());
    assert!(compile("a == 'unterminated").is_err());
    assert!(compile("").is_err());
    let bad = CompiledRoutes::compile(&[rule("true"), rule("(")]).unwrap_err();
    assert_eq!(bad.index, 1);
    assert!(bad.to_string().starts_with("routes[1].when: "), "{bad}");
    // The lenient build keeps going: the broken rule never matches and says why.
    let r = CompiledRoutes::new(&[rule("("), rule("true")]);
    assert_eq!(r.len(), 2);
    let ctx = Map::new();
    let outcome = r.first_match(&input(&ctx, "hit"));
    assert_eq!(outcome.matched, Some(1));
    assert_eq!(
        outcome.errors,
        [(0, "the expression did not compile".into())]
    );
    assert_eq!(format!("{r:?}"), "CompiledRoutes { rules: 2, broken: 1 }");
}

#[test]
fn compiled_routes_are_shareable() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<CompiledRoutes>();
}

/// Arbitrary JSON, a few levels deep, with names that collide with the fields the
/// expressions below read.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        Just(Value::from("10000")),
        Just(Value::from("[")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec((field_name(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("risk_score".to_string()),
        Just("flagged".to_string()),
        Just("budget".to_string()),
        Just("lead_source".to_string()),
        Just("status".to_string()),
        Just("ctx".to_string()),
        Just("tags".to_string()),
        ".{0,6}",
    ]
}

const EXPRESSIONS: [&str; 14] = [
    "risk_score >= 80 || flagged == true",
    "lead_source != '' && int(budget) >= 5000",
    "status == 'fallback'",
    "caller.startsWith('+44')",
    "budget + 1 > risk_score * 2",
    "risk_score / budget == 0 || risk_score % budget == 1",
    "size(tags) > 2 && tags[0] == 'vip'",
    "tags.exists(t, t == 'x') || tags.all(t, t > 0)",
    "lead_source.matches(budget)",
    "'k' in ctx.flagged",
    "double(risk_score) > 1.5 && uint(budget) < 10u",
    "string(risk_score) + string(flagged) == 'x'",
    "-risk_score < 0",
    "has(ctx.tags) ? tags.map(t, t + t).size() > 0 : budget",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any context: every rule either gives a bool or an error; nothing panics.
    #[test]
    fn any_context_never_panics(
        fields in prop::collection::vec((field_name(), arb_json()), 0..8),
        caller in ".{0,16}",
    ) {
        let ctx: Map<String, Value> = fields.into_iter().collect();
        let r = routes(&EXPRESSIONS);
        let input = RouteInput { context: &ctx, caller: &caller, called: "", agent: "a", status: "hit" };
        let outcome = r.first_match(&input);
        let last = outcome.matched.unwrap_or(EXPRESSIONS.len() - 1);
        prop_assert!(outcome.errors.iter().all(|(i, _)| *i <= last));
        for (_, error) in &outcome.errors {
            prop_assert!(!error.contains('\n'));
            prop_assert!(error.chars().count() <= 301);
        }
    }
}

#[test]
fn extensions_are_loaded() {
    for expr in [
        "name.lowerAscii() == 'ada'",
        "name.indexOf('D') == 1",
        "math.greatest(1, score) == 7",
        "[1, 2].distinct().size() == 2 || true",
        "optional.of(1).hasValue()",
        "[1].exists_one(x, x == 1)",
    ] {
        assert_eq!(
            eval(expr, json!({"name": "ADA", "score": 7})),
            Ok(true),
            "{expr}"
        );
    }
}

#[test]
fn unknown_functions_do_not_compile() {
    assert_eq!(
        compile("caller.startswith('+44')").unwrap_err(),
        "unknown function \"startswith\""
    );
    assert_eq!(
        compile("max(a, 1) > nofunc(b)").unwrap_err(),
        "unknown functions \"max\", \"nofunc\""
    );
    // Field names are not functions; operators and macros are fine.
    compile("max > 1 && !flag && x in [1] && l.all(t, t > 0) && has(ctx.a) && (a ? b : c)")
        .unwrap();
}

#[test]
fn parse_errors_name_the_column() {
    assert_eq!(
        compile("a b").unwrap_err(),
        "column 3: extraneous input 'b' expecting <EOF>"
    );
    let err = compile("risk_score >=").unwrap_err();
    assert!(
        err.starts_with("column 14: mismatched input '<EOF>'"),
        "{err}"
    );
    let err = compile("a == 'x").unwrap_err();
    assert!(
        err.starts_with("column 6: token recognition error"),
        "{err}"
    );
    assert!(err.contains("; column 8: "), "{err}");
}
