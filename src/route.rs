//! Routing rules (`[[agents.routes]]`): CEL expressions over a call's settled context,
//! evaluated in order; the first that is `true` picks where the call goes. Pure: no IO,
//! no clock.
//!
//! # What an expression sees
//! - `caller`, `called`, `agent`, `status`: strings (the caller's and the called number as
//!   normalised, the agent id, and `hit` / `waited` / `fallback` / `looked-up`).
//! - Every context field as a top-level variable of the same name (`risk_score >= 80`).
//!   JSON maps to CEL as `null` → `null`, `true` → `bool`, an integer → `int` (`uint`
//!   past `i64::MAX`), any other number → `double`, a string → `string`, an array →
//!   `list`, an object → `map`.
//! - `ctx`: the whole context as one map, for the fields a bare name cannot reach: a name
//!   that is not a CEL identifier (`ctx['lead-source']`), a CEL keyword (`ctx['in']`), a
//!   field shadowed by a built-in (`ctx.status`), and presence tests (`has(ctx.flagged)`).
//!
//! The four built-ins and `ctx` win over context fields of the same names: a posted
//! `status` field must not be able to pose as the settled status a rule tests.
//!
//! Functions: CEL's standard library (`int()`, `size()`, `startsWith`, `matches`, `has`,
//! `exists`, ...) plus its `strings` (`lowerAscii`, `indexOf`, ...), `math`
//! (`math.greatest`, ...) and `lists` extensions; no timestamps or durations (built
//! without chrono). Calling a function that does not exist is a compile error, so
//! `precall check` catches a misspelt `startswith`.
//!
//! # Errors at run time
//! A referenced field that is missing, an operator applied to the wrong type, or a
//! non-`bool` result makes that rule not match; the error comes back in
//! [`RouteOutcome::errors`] for the caller to log and count, and the next rule is tried.
//! CEL's `||` and `&&` absorb an error when the other side decides the result
//! (`risk_score >= 80 || flagged == true` is `true` for `{"risk_score": 92}`). The error
//! texts name types and fields, never context values, so they are safe to log.
//!
//! # Cost
//! Nothing is converted up front: a field becomes a CEL value only when an expression
//! reads it, and strings are borrowed, not copied.

use std::collections::HashMap;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::objects::Value as CelValue;
use cel::parser::Expression;
use cel::{Context, Env, ExecutionError, Program};
use serde_json::{Map, Value};

use crate::config::RouteConfig;

/// The variable holding the whole context as a map.
pub const CTX: &str = "ctx";

/// Names an expression sees that are not context fields; they win over fields of the same
/// name.
pub const BUILTINS: [&str; 5] = ["caller", "called", "agent", "status", CTX];

/// What a call's routes are evaluated against.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    /// The effective context (posted or looked-up fields over the agent's defaults).
    pub context: &'a Map<String, Value>,
    /// The caller's number as normalised (`+14155550123`), `""` when unknown.
    pub caller: &'a str,
    /// The called number as normalised, `""` when unknown.
    pub called: &'a str,
    /// The agent id the call is for.
    pub agent: &'a str,
    /// How the context was settled ([`crate::inject::Status::as_str`]).
    pub status: &'a str,
}

/// The result of [`CompiledRoutes::first_match`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteOutcome {
    /// Index of the first rule whose expression is `true`; `None`: stay on the default.
    pub matched: Option<usize>,
    /// Rules tried before the match (or all, without one) whose expression failed, with
    /// the error. They did not match. Log and count them.
    pub errors: Vec<(usize, String)>,
}

/// A rule's `when` that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("routes[{index}].when: {message}")]
pub struct CompileError {
    /// Index of the rule in the agent's `routes`.
    pub index: usize,
    /// CEL's parse error, on one line.
    pub message: String,
}

/// One agent's rules, compiled once per config.
pub struct CompiledRoutes {
    /// One per rule, in order; `None` for an expression that did not compile (config
    /// validation rejects those, so this only happens to hand-built configs).
    programs: Vec<Option<Program>>,
    /// The rules' `when` texts, to tell a key the expression names from one taken from
    /// the context when describing an error.
    sources: Vec<String>,
    /// The standard CEL environment, shared: building one per call would cost more than
    /// evaluating most rules.
    env: Arc<Env>,
}

impl fmt::Debug for CompiledRoutes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledRoutes")
            .field("rules", &self.programs.len())
            .field(
                "broken",
                &self.programs.iter().filter(|p| p.is_none()).count(),
            )
            .finish()
    }
}

/// The environment expressions compile and run in, built once per process: CEL's
/// standard library plus its `strings` (`lowerAscii`, `indexOf`, ...), `math`
/// (`math.greatest`, ...) and `lists` extensions.
fn environment() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    Arc::clone(ENV.get_or_init(|| {
        let mut env = Env::stdlib();
        for (name, extension) in [
            ("strings", cel::extensions::strings as fn(&mut Env) -> _),
            ("math", cel::extensions::math),
            ("lists", cel::extensions::lists),
        ] {
            if let Err(error) = extension(&mut env) {
                tracing::error!(extension = name, %error, "CEL extension not loaded");
            }
        }
        Arc::new(env)
    }))
}

/// Compiles one `when` expression, and checks that every function it calls exists (CEL
/// would only find out at run time, for every call, and a misspelt `startswith` would
/// silently never match).
///
/// # Errors
/// CEL's parse error, or the unknown function, on one line.
pub fn compile(source: &str) -> Result<Program, String> {
    let env = environment();
    // The parser is ANTLR-generated; a panic on some input would otherwise take config
    // loading (or `precall check`) down with a backtrace instead of a message.
    let program = match panic::catch_unwind(AssertUnwindSafe(|| env.compile(source))) {
        Ok(Ok(program)) => program,
        Ok(Err(errors)) => return Err(parse_errors(&errors)),
        Err(_) => return Err("the expression parser failed on this input".to_string()),
    };
    let unknown = unknown_functions(&program, &env);
    if !unknown.is_empty() {
        return Err(format!(
            "unknown function{} {}",
            if unknown.len() == 1 { "" } else { "s" },
            unknown
                .iter()
                .map(|f| format!("{f:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(program)
}

/// CEL's parse errors as `column C: message`, joined with `; ` (the expression is one
/// line of config, so the line number and CEL's caret drawing add nothing).
fn parse_errors(errors: &cel::ParseErrors) -> String {
    let text = errors
        .errors
        .iter()
        .map(|e| {
            let message = e.msg.strip_prefix("Syntax error: ").unwrap_or(&e.msg);
            // `pos` is (line, column), both from 1.
            if e.pos.1 > 0 {
                format!("column {}: {message}", e.pos.1)
            } else {
                message.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    one_line(&text)
}

/// Named functions (`int`, `startsWith`, `math.greatest`) the program calls that `env`
/// does not declare, sorted. Operators (`_&&_`, `!_`, `@in`) are the interpreter's own.
fn unknown_functions(program: &Program, env: &Arc<Env>) -> Vec<String> {
    let mut calls = Vec::new();
    collect_calls(program.expression(), &mut calls);
    // The public way to ask an Env whether it declares a name: adding a function of that
    // name to a scratch context is refused exactly when it does.
    let mut probe = Context::with_env(Arc::clone(env));
    let mut is_declared = |name: &str| probe.add_function(name, || false).is_err();
    let mut unknown: Vec<String> = Vec::new();
    for (name, namespace) in calls {
        if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
            continue;
        }
        // `optional.of(1)` parses as a call of `of` on the identifier `optional`.
        let is_known =
            is_declared(name) || namespace.is_some_and(|ns| is_declared(&format!("{ns}.{name}")));
        if !is_known && !unknown.iter().any(|u| u == name) {
            unknown.push(name.to_string());
        }
    }
    unknown.sort();
    unknown
}

/// Every call in `expr`: the function name and, for a call on a plain (possibly dotted)
/// identifier, that identifier (a namespace candidate).
fn collect_calls<'e>(expr: &'e Expression, out: &mut Vec<(&'e str, Option<String>)>) {
    use cel::common::ast::{EntryExpr, Expr};
    match &expr.expr {
        Expr::Call(call) => {
            let namespace = call.target.as_deref().and_then(dotted_name);
            out.push((call.func_name.as_str(), namespace));
            if let Some(target) = &call.target {
                collect_calls(target, out);
            }
            for arg in &call.args {
                collect_calls(arg, out);
            }
        }
        Expr::Comprehension(comp) => {
            for part in [
                &comp.iter_range,
                &comp.accu_init,
                &comp.loop_cond,
                &comp.loop_step,
                &comp.result,
            ] {
                collect_calls(part, out);
            }
        }
        Expr::List(list) => {
            for element in &list.elements {
                collect_calls(element, out);
            }
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                match &entry.expr {
                    EntryExpr::StructField(field) => collect_calls(&field.value, out),
                    EntryExpr::MapEntry(entry) => {
                        collect_calls(&entry.key, out);
                        collect_calls(&entry.value, out);
                    }
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                match &entry.expr {
                    EntryExpr::StructField(field) => collect_calls(&field.value, out),
                    EntryExpr::MapEntry(entry) => {
                        collect_calls(&entry.key, out);
                        collect_calls(&entry.value, out);
                    }
                }
            }
        }
        Expr::Select(select) => collect_calls(&select.operand, out),
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
    }
}

/// `a` or `a.b.c` when `expr` spells a dotted identifier.
fn dotted_name(expr: &Expression) -> Option<String> {
    use cel::common::ast::Expr;
    match &expr.expr {
        Expr::Ident(name) => Some(name.clone()),
        Expr::Select(select) if !select.test => Some(format!(
            "{}.{}",
            dotted_name(&select.operand)?,
            select.field
        )),
        _ => None,
    }
}

impl CompiledRoutes {
    /// Compiles every rule, strictly (config validation uses [`compile`] per rule).
    ///
    /// # Errors
    /// The first rule whose `when` does not compile.
    pub fn compile(routes: &[RouteConfig]) -> Result<CompiledRoutes, CompileError> {
        let mut programs = Vec::with_capacity(routes.len());
        for (index, route) in routes.iter().enumerate() {
            let program =
                compile(&route.when).map_err(|message| CompileError { index, message })?;
            programs.push(Some(program));
        }
        Ok(CompiledRoutes {
            programs,
            sources: routes.iter().map(|r| r.when.clone()).collect(),
            env: environment(),
        })
    }

    /// Compiles every rule; one that does not compile never matches (and reports an error
    /// each time it is reached), and is logged here once.
    pub fn new(routes: &[RouteConfig]) -> CompiledRoutes {
        let programs = routes
            .iter()
            .enumerate()
            .map(|(index, route)| match compile(&route.when) {
                Ok(program) => Some(program),
                Err(error) => {
                    tracing::error!(
                        rule = index,
                        %error,
                        "route expression does not compile; it never matches"
                    );
                    None
                }
            })
            .collect();
        CompiledRoutes {
            programs,
            sources: routes.iter().map(|r| r.when.clone()).collect(),
            env: environment(),
        }
    }

    /// How many rules there are.
    pub fn len(&self) -> usize {
        self.programs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.programs.is_empty()
    }

    /// Evaluates the rules in order and returns the first that is `true`, with the errors
    /// of the rules tried before it. Call once the context is settled (hit, waited,
    /// looked-up or fallback). Never panics, whatever the context holds.
    pub fn first_match(&self, input: &RouteInput<'_>) -> RouteOutcome {
        let mut outcome = RouteOutcome::default();
        if self.programs.is_empty() {
            return outcome;
        }
        let resolver = Resolver { input };
        let mut context = Context::with_env(Arc::clone(&self.env));
        context.set_variable_resolver(&resolver);
        for (index, program) in self.programs.iter().enumerate() {
            let Some(program) = program else {
                outcome
                    .errors
                    .push((index, "the expression did not compile".to_string()));
                continue;
            };
            let source = self.sources.get(index).map_or("", String::as_str);
            match evaluate(program, source, &context) {
                Ok(true) => {
                    outcome.matched = Some(index);
                    break;
                }
                Ok(false) => {}
                Err(error) => outcome.errors.push((index, error)),
            }
        }
        outcome
    }
}

/// Runs one program; `Ok` only for a `bool` result.
fn evaluate(program: &Program, source: &str, context: &Context<'_, '_>) -> Result<bool, String> {
    // Defence in depth: the interpreter is a dependency evaluating hostile data on the SIP
    // path; a panic in it must cost one rule, not the proxy task.
    let result = panic::catch_unwind(AssertUnwindSafe(|| program.execute(context)))
        .map_err(|_| "the interpreter failed on this input".to_string())?;
    match result {
        Ok(CelValue::Bool(b)) => Ok(b),
        Ok(other) => Err(format!(
            "the expression gave {}, not a bool",
            other.type_of()
        )),
        Err(error) => Err(describe(&error, source)),
    }
}

/// An execution error as text that names types, fields and functions but holds no context
/// value (CEL's own Display prints the values, which may be personal data or huge). A
/// missing map key is named only when `source`, the expression, spells it.
fn describe(error: &ExecutionError, source: &str) -> String {
    #[allow(deprecated)]
    let text = match error {
        ExecutionError::UndeclaredReference(name) => {
            format!("no field {name:?} in the context")
        }
        ExecutionError::NoSuchKey(key) if !key.is_empty() && source.contains(key.as_str()) => {
            format!("no key {key:?}")
        }
        ExecutionError::NoSuchKey(_) => "no such key in a map".to_string(),
        ExecutionError::UnsupportedTargetType { target } => {
            format!("unsupported target type {}", target.type_of())
        }
        ExecutionError::NotSupportedAsMethod { method, target } => {
            format!("method {method:?} is not supported on {}", target.type_of())
        }
        ExecutionError::UnsupportedKeyType(value) => {
            format!("a {} cannot be a map key", value.type_of())
        }
        ExecutionError::ValuesNotComparable(a, b) => {
            format!("{} cannot be compared to {}", a.type_of(), b.type_of())
        }
        ExecutionError::UnsupportedUnaryOperator(op, value) => {
            format!("operator {op} does not apply to {}", value.type_of())
        }
        ExecutionError::UnsupportedBinaryOperator(op, a, b) => format!(
            "operator {op} does not apply to {} and {}",
            a.type_of(),
            b.type_of()
        ),
        ExecutionError::UnsupportedMapIndex(value) => {
            format!("a {} cannot index a map", value.type_of())
        }
        ExecutionError::UnsupportedListIndex(value) => {
            format!("a {} cannot index a list", value.type_of())
        }
        ExecutionError::UnsupportedIndex(index, target) => {
            format!("a {} cannot index a {}", index.type_of(), target.type_of())
        }
        ExecutionError::DivisionByZero(_) => "division by zero".to_string(),
        ExecutionError::RemainderByZero(_) => "remainder by zero".to_string(),
        ExecutionError::Overflow(op, a, b) => {
            format!("overflow in {} {op} {}", a.type_of(), b.type_of())
        }
        ExecutionError::IndexOutOfBounds(_) => "index out of bounds".to_string(),
        ExecutionError::DuplicateKey(_) => "a map literal repeats a key".to_string(),
        // Function errors quote their argument (`int("abc")` says `"abc"`): keep the
        // function name only.
        ExecutionError::FunctionError { function, .. } => {
            format!("function {function:?} failed on its argument")
        }
        // The rest carry names and types only.
        other => other.to_string(),
    };
    one_line(&text)
}

/// Text on one line (CEL's parse errors point at the column on a second line), bounded.
fn one_line(text: &str) -> String {
    const MAX: usize = 300;
    let mut line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > MAX {
        let mut cut = MAX;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

/// Looks variables up on demand: built-ins first, then context fields.
struct Resolver<'a> {
    input: &'a RouteInput<'a>,
}

impl VariableResolver for Resolver<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let input = self.input;
        let text = |s: &'b str| Some(CowVal::owned(CelString::from(s)));
        match variable {
            "caller" => text(input.caller),
            "called" => text(input.called),
            "agent" => text(input.agent),
            "status" => text(input.status),
            CTX => Some(CowVal::Owned(map_to_val(input.context))),
            field => input.context.get(field).map(|v| CowVal::Owned(to_val(v))),
        }
    }
}

/// A JSON value as a CEL value, strings borrowed.
fn to_val(value: &Value) -> Box<dyn Val + '_> {
    match value {
        Value::Null => Box::new(CelNull),
        Value::Bool(b) => Box::new(CelBool::from(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Box::new(CelInt::from(i))
            } else if let Some(u) = n.as_u64() {
                Box::new(CelUInt::from(u))
            } else {
                // Without arbitrary_precision every JSON number is one of the three.
                Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Value::String(s) => Box::new(CelString::from(s.as_str())),
        Value::Array(items) => {
            Box::new(CelList::from(items.iter().map(to_val).collect::<Vec<_>>()))
        }
        Value::Object(map) => map_to_val(map),
    }
}

fn map_to_val(map: &Map<String, Value>) -> Box<dyn Val + '_> {
    let entries: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> = map
        .iter()
        .map(|(k, v)| (CelMapKey::from(k.as_str()), to_val(v)))
        .collect();
    Box::new(CelMap::from(entries))
}

#[cfg(test)]
mod tests;
