//! Workflow definitions: read from YAML or JSON, checked whole, and turned into the graph a
//! run is started from. Nothing here touches the database.
//!
//! ```yaml
//! name: nightly            # optional; the path names the workflow
//! steps:
//!   - id: fetch
//!     kind: bash           # the job spec's own fields sit in the step
//!     script: ./fetch.sh
//!     artifacts: ["data/**"]
//!   - id: report
//!     depends_on: [fetch]
//!     if: steps.fetch.output.value.changed == true
//!     retry: {max_attempts: 5, initial_ms: 2000}
//!     kind: bash
//!     script: make report FROM={{ steps.fetch.output.value.file }}
//! on_failure: {id: alert, kind: bash, script: ./page.sh}
//! ```
//!
//! Every problem is found, not just the first, and each names what it is about: a YAML
//! syntax error with its line and column; a field of the wrong type by its path; duplicate
//! ids, unknown dependencies, self-dependencies and cycles (with their members); a template,
//! condition or `for_each` that reads a step that is not an ancestor. The checks are
//! iterative (no recursion over the graph), so 10,000 steps validate in milliseconds.
//!
//! References read `input.<path>`, `steps.<id>.output.<path>` (a step's output is its job's
//! result), and inside a `for_each` step `item.<path>` and `index`. A path is dotted names
//! and `[n]` indices. In string fields of a step's spec, `{{ reference }}` is replaced at run
//! time by the value (strings as they are, anything else as JSON).

use std::collections::{BTreeMap, HashMap};

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Deserialize;
use serde_json::{Map, Value};
use sluice_protocol::api::RetryPolicy;
use sluice_protocol::parse_spec;

/// Most steps a definition may hold.
pub const MAX_STEPS: usize = 10_000;
/// Longest step id.
/// Most `artifacts` patterns of one step.
pub const MAX_ARTIFACT_PATTERNS: usize = 100;
const MAX_ID_BYTES: usize = 128;
/// Keys of a step that are the step's, not its job spec's.
const STEP_KEYS: [&str; 8] = [
    "id",
    "depends_on",
    "retry",
    "timeout_ms",
    "artifacts",
    "if",
    "for_each",
    "queue",
];

/// A checked definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub input_schema: Option<Value>,
    /// In the order written.
    pub steps: Vec<Step>,
    /// Run when the run fails (it depends on nothing).
    pub on_failure: Option<Step>,
    /// The definition as stored and hashed: canonical JSON (keys sorted).
    pub canonical: Value,
}

/// One step: a job, with its place in the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    pub depends_on: Vec<String>,
    /// The job spec (`kind` and its fields), templates unresolved.
    pub spec: Value,
    pub queue: Option<String>,
    pub retry: Option<RetryPolicy>,
    pub timeout_ms: Option<u64>,
    pub artifacts: Vec<String>,
    pub condition: Option<Condition>,
    /// The list this step fans out over, one job per element.
    pub for_each: Option<Reference>,
}

/// Where a value is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// `input.<path>`
    Input(Vec<Segment>),
    /// `steps.<id>.output.<path>`
    Step(String, Vec<Segment>),
    /// `item.<path>` (in a `for_each` step).
    Item(Vec<Segment>),
    /// `index` (in a `for_each` step).
    Index,
    /// `run.id`, `run.workflow`.
    Run(Vec<Segment>),
    /// `failure.step`, `failure.error…` (in the failure step).
    Failure(Vec<Segment>),
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// An `if`: a reference is truthy, falsy, or (un)equal to a JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Truthy(Reference),
    Falsy(Reference),
    Equals(Reference, Value),
    Differs(Reference, Value),
}

/// A problem of a definition, with what it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `steps[3].depends_on`, `line 7, column 3`, …
    pub at: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

fn problem(at: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        at: at.into(),
        message: message.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input_schema: Option<Value>,
    steps: Vec<Map<String, Value>>,
    #[serde(default)]
    on_failure: Option<Map<String, Value>>,
}

/// The step's own fields (the rest of the object is its job spec).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: String,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    retry: Option<RetryPolicy>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    artifacts: Vec<String>,
    #[serde(default, rename = "if")]
    condition: Option<String>,
    #[serde(default)]
    for_each: Option<String>,
}

/// Reads a definition (YAML, of which JSON is a subset) registered as `name`, and checks it
/// whole. `Err` lists every problem found.
pub fn parse(text: &str, name: &str) -> Result<Definition, Vec<Problem>> {
    let document: Value = match serde_norway::from_str(text) {
        Ok(document) => document,
        Err(err) => {
            let at = match err.location() {
                Some(at) => format!("line {}, column {}", at.line(), at.column()),
                None => "definition".to_string(),
            };
            return Err(vec![problem(at, err.to_string())]);
        }
    };
    let raw: RawDefinition = serde_path_to_error::deserialize(document.clone()).map_err(|e| {
        let at = match e.path().to_string() {
            path if path == "." => "definition".to_string(),
            path => path,
        };
        vec![problem(at, e.into_inner().to_string())]
    })?;
    let mut problems = Vec::new();
    if let Some(named) = &raw.name {
        if named != name {
            problems.push(problem(
                "name",
                format!("names workflow {named:?}, but it is registered as {name:?}"),
            ));
        }
    }
    if raw.steps.is_empty() {
        problems.push(problem("steps", "a workflow needs at least one step"));
    }
    if raw.steps.len() > MAX_STEPS {
        return Err(vec![problem("steps", format!("at most {MAX_STEPS} steps"))]);
    }
    let mut steps = Vec::with_capacity(raw.steps.len());
    for (index, object) in raw.steps.into_iter().enumerate() {
        if let Some(step) = read_step(object, &format!("steps[{index}]"), &mut problems) {
            steps.push(step);
        }
    }
    let on_failure = raw
        .on_failure
        .and_then(|object| read_step(object, "on_failure", &mut problems));
    if let Some(step) = &on_failure {
        if !step.depends_on.is_empty() {
            problems.push(problem(
                "on_failure.depends_on",
                "the failure step runs when the run fails; it depends on nothing",
            ));
        }
        if step.for_each.is_some() {
            problems.push(problem("on_failure.for_each", "the failure step runs once"));
        }
        if steps.iter().any(|s| s.id == step.id) {
            problems.push(problem(
                "on_failure.id",
                format!("{:?} is also the id of a step", step.id),
            ));
        }
    }
    check_graph(&steps, on_failure.as_ref(), &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Definition {
        input_schema: raw.input_schema,
        steps,
        on_failure,
        canonical: canonical(document, name),
    })
}

impl Definition {
    /// The plan a run is started from (see `sql/0007_workflow_runs.sql`): per step its
    /// parents and children, the job to enqueue, and its `if` and `for_each` as paths into
    /// the step's context.
    pub fn plan(&self) -> Value {
        let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
        for step in &self.steps {
            for parent in &step.depends_on {
                children
                    .entry(parent.as_str())
                    .or_default()
                    .push(step.id.as_str());
            }
        }
        let steps: Vec<Value> = self
            .steps
            .iter()
            .enumerate()
            .map(|(position, step)| {
                let mut entry = step_plan(step);
                entry["position"] = Value::from(position);
                entry["children"] =
                    Value::from(children.get(step.id.as_str()).cloned().unwrap_or_default());
                entry
            })
            .collect();
        let mut plan = serde_json::json!({ "steps": steps });
        if let Some(step) = &self.on_failure {
            let mut entry = step_plan(step);
            entry["position"] = Value::from(-1);
            entry["children"] = Value::Array(Vec::new());
            plan["on_failure"] = entry;
        }
        plan
    }
}

/// A step's plan entry, without its place in the graph.
fn step_plan(step: &Step) -> Value {
    let mut job = serde_json::json!({ "spec": step.spec });
    if let Some(queue) = &step.queue {
        job["queue"] = Value::from(queue.as_str());
    }
    if let Some(ms) = step.timeout_ms {
        job["timeout_ms"] = Value::from(ms);
    }
    if let Some(policy) = step.retry {
        if let Some(attempts) = policy.max_attempts {
            job["max_attempts"] = Value::from(attempts);
        }
        let stored = RetryPolicy {
            max_attempts: None,
            ..policy
        };
        if stored != RetryPolicy::default() {
            job["retry"] = serde_json::to_value(stored).unwrap_or_default();
        }
    }
    // The steps whose outputs its context holds: its parents, and every step it names.
    let mut reads: Vec<&str> = step.depends_on.iter().map(String::as_str).collect();
    let named = templates(&step.spec)
        .into_iter()
        .flatten()
        .chain(step.condition.iter().map(|c| c.reference().clone()))
        .chain(step.for_each.iter().cloned())
        .collect::<Vec<_>>();
    for reference in &named {
        if let Some(id) = reference.step() {
            if !reads.contains(&id) {
                reads.push(id);
            }
        }
    }
    let mut entry = serde_json::json!({
        "id": step.id,
        "parents": step.depends_on,
        "reads": reads,
        "job": job,
    });
    if let Some(condition) = &step.condition {
        let (op, reference, value) = match condition {
            Condition::Truthy(r) => ("truthy", r, None),
            Condition::Falsy(r) => ("falsy", r, None),
            Condition::Equals(r, v) => ("eq", r, Some(v)),
            Condition::Differs(r, v) => ("ne", r, Some(v)),
        };
        let mut compiled = serde_json::json!({"op": op, "path": reference.path()});
        if let Some(value) = value {
            compiled["value"] = value.clone();
        }
        entry["condition"] = compiled;
    }
    if let Some(list) = &step.for_each {
        entry["for_each"] = Value::from(list.path());
    }
    if !step.artifacts.is_empty() {
        entry["artifacts"] = Value::from(step.artifacts.clone());
    }
    entry
}

/// The document as stored and hashed: JSON with sorted keys (serde_json's map), with the name
/// it is registered under.
fn canonical(mut document: Value, name: &str) -> Value {
    if let Value::Object(map) = &mut document {
        map.insert("name".into(), Value::String(name.into()));
    }
    document
}

fn valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_ID_BYTES
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// One step's fields, its spec checked; `None` (with problems noted) when it cannot be read.
fn read_step(
    mut object: Map<String, Value>,
    at: &str,
    problems: &mut Vec<Problem>,
) -> Option<Step> {
    let mut own = Map::new();
    for key in STEP_KEYS {
        if let Some(value) = object.remove(key) {
            own.insert(key.to_string(), value);
        }
    }
    let raw: RawStep = match serde_path_to_error::deserialize(Value::Object(own)) {
        Ok(raw) => raw,
        Err(e) => {
            problems.push(problem(
                format!("{at}.{}", e.path()),
                e.into_inner().to_string(),
            ));
            return None;
        }
    };
    let at = format!("{at} ({})", raw.id);
    if !valid_id(&raw.id) {
        problems.push(problem(
            format!("{at}.id"),
            "must be 1-128 letters, digits, '_' or '-', starting with a letter or digit",
        ));
    }
    let spec = Value::Object(object);
    if let Err(err) = parse_spec(&spec) {
        problems.push(problem(format!("{at}.spec"), err.0));
    }
    let condition = raw.condition.as_deref().and_then(|text| {
        parse_condition(text)
            .map_err(|message| problems.push(problem(format!("{at}.if"), message)))
            .ok()
    });
    let for_each = raw.for_each.as_deref().and_then(|text| {
        parse_reference(text.trim())
            .map_err(|message| problems.push(problem(format!("{at}.for_each"), message)))
            .ok()
    });
    if let Some(queue) = &raw.queue {
        if !crate::service::jobs::valid_queue_name(queue) {
            problems.push(problem(format!("{at}.queue"), "not a valid queue name"));
        }
    }
    if let Some(ms) = raw.timeout_ms {
        if !(1..=sluice_protocol::bounds::MAX_TIMEOUT_MS).contains(&ms) {
            problems.push(problem(
                format!("{at}.timeout_ms"),
                format!(
                    "must be between 1 and {}",
                    sluice_protocol::bounds::MAX_TIMEOUT_MS
                ),
            ));
        }
    }
    if let Some(policy) = &raw.retry {
        if let Err(err) = crate::service::jobs::check_retry(policy) {
            problems.push(problem(format!("{at}.retry"), err.to_string()));
        }
    }
    if !raw.artifacts.is_empty() && spec.get("kind").and_then(Value::as_str) == Some("noop") {
        problems.push(problem(
            format!("{at}.artifacts"),
            "a noop step has no workspace to pack artifacts from",
        ));
    }
    if !raw.artifacts.is_empty() && raw.for_each.is_some() {
        problems.push(problem(
            format!("{at}.artifacts"),
            "a for_each step cannot declare artifacts (its jobs would write the same paths); collect them in a step after it",
        ));
    }
    if raw.artifacts.len() > MAX_ARTIFACT_PATTERNS {
        problems.push(problem(
            format!("{at}.artifacts"),
            format!("at most {MAX_ARTIFACT_PATTERNS} patterns"),
        ));
    }
    for (field, pattern) in raw.artifacts.iter().enumerate() {
        if pattern.len() > 1024 || pattern.contains('\0') {
            problems.push(problem(
                format!("{at}.artifacts[{field}]"),
                "must be at most 1024 bytes, without NUL",
            ));
        } else if pattern.is_empty()
            || pattern.starts_with('/')
            || pattern.split('/').any(|p| p == "..")
        {
            problems.push(problem(
                format!("{at}.artifacts[{field}]"),
                "must be a relative pattern beneath the workspace (no '/' at the start, no '..')",
            ));
        }
    }
    Some(Step {
        id: raw.id,
        depends_on: raw.depends_on,
        spec,
        queue: raw.queue,
        retry: raw.retry,
        timeout_ms: raw.timeout_ms,
        artifacts: raw.artifacts,
        condition,
        for_each,
    })
}

/// Parses a reference: `input…`, `steps.<id>.output…`, `item…`, `index`, `run…`,
/// `failure…`.
pub fn parse_reference(text: &str) -> Result<Reference, String> {
    let mut segments = parse_path(text)?;
    let first = match segments.first() {
        Some(Segment::Key(first)) => first.clone(),
        _ => return Err(format!("{text:?} does not start with {ROOTS}")),
    };
    segments.remove(0);
    match first.as_str() {
        "input" => Ok(Reference::Input(segments)),
        "item" => Ok(Reference::Item(segments)),
        "run" => Ok(Reference::Run(segments)),
        "failure" => Ok(Reference::Failure(segments)),
        "index" if segments.is_empty() => Ok(Reference::Index),
        "steps" => match (segments.first(), segments.get(1)) {
            (Some(Segment::Key(id)), Some(Segment::Key(output))) if output == "output" => {
                Ok(Reference::Step(id.clone(), segments[2..].to_vec()))
            }
            _ => Err(format!(
                "{text:?}: a step's value is read as steps.<id>.output…"
            )),
        },
        _ => Err(format!("{text:?} does not start with {ROOTS}")),
    }
}

/// What a reference may start with.
const ROOTS: &str = "input, steps, item, index, run or failure";

/// `a.b[2].c` into segments.
fn parse_path(text: &str) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    for part in text.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        {
            return Err(format!(
                "{text:?} is not a path (names and [n], joined by dots)"
            ));
        }
        segments.push(Segment::Key(name.to_string()));
        while !rest.is_empty() {
            let end = rest
                .find(']')
                .ok_or_else(|| format!("{text:?}: an index is not closed"))?;
            let index = rest[1..end]
                .parse::<usize>()
                .map_err(|_| format!("{text:?}: an index must be a number"))?;
            segments.push(Segment::Index(index));
            rest = &rest[end + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(format!("{text:?} is not a path"));
            }
        }
    }
    Ok(segments)
}

/// Parses an `if`: `<reference>`, `not <reference>`, `<reference> == <json>`,
/// `<reference> != <json>`.
pub fn parse_condition(text: &str) -> Result<Condition, String> {
    let text = text.trim();
    for (operator, equal) in [("==", true), ("!=", false)] {
        if let Some((left, right)) = text.split_once(operator) {
            let reference = parse_reference(left.trim())?;
            let value: Value = serde_json::from_str(right.trim()).map_err(|_| {
                format!(
                    "{:?} is not a JSON value (quote strings: \"text\")",
                    right.trim()
                )
            })?;
            return Ok(if equal {
                Condition::Equals(reference, value)
            } else {
                Condition::Differs(reference, value)
            });
        }
    }
    match text.strip_prefix("not ") {
        Some(rest) => parse_reference(rest.trim()).map(Condition::Falsy),
        None => parse_reference(text).map(Condition::Truthy),
    }
}

/// Every `{{ reference }}` in the string fields of `value`, with where it was found.
pub fn templates(value: &Value) -> Vec<Result<Reference, String>> {
    let mut found = Vec::new();
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::String(text) => {
                let mut rest = text.as_str();
                while let Some(start) = rest.find("{{") {
                    let Some(end) = rest[start..].find("}}") else {
                        found.push(Err(format!("{text:?}: a '{{{{' is not closed")));
                        break;
                    };
                    found.push(parse_reference(rest[start + 2..start + end].trim()));
                    rest = &rest[start + end + 2..];
                }
            }
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    found
}

impl Reference {
    /// Where it reads in a step's context (`{"input", "steps": {id: {"output"}}, "item",
    /// "index"}`), as the text path `#>` takes.
    pub fn path(&self) -> Vec<String> {
        let (mut path, segments): (Vec<String>, &[Segment]) = match self {
            Reference::Input(s) => (vec!["input".into()], s),
            Reference::Step(id, s) => (vec!["steps".into(), id.clone(), "output".into()], s),
            Reference::Item(s) => (vec!["item".into()], s),
            Reference::Index => (vec!["index".into()], &[]),
            Reference::Run(s) => (vec!["run".into()], s),
            Reference::Failure(s) => (vec!["failure".into()], s),
        };
        path.extend(segments.iter().map(|segment| match segment {
            Segment::Key(key) => key.clone(),
            Segment::Index(index) => index.to_string(),
        }));
        path
    }

    /// The step this reference reads, if it reads one.
    fn step(&self) -> Option<&str> {
        match self {
            Reference::Step(id, _) => Some(id),
            _ => None,
        }
    }
}

impl Condition {
    fn reference(&self) -> &Reference {
        match self {
            Condition::Truthy(r) | Condition::Falsy(r) => r,
            Condition::Equals(r, _) | Condition::Differs(r, _) => r,
        }
    }
}

/// Ids, dependencies, cycles, and that every reference reads an ancestor.
fn check_graph(steps: &[Step], on_failure: Option<&Step>, problems: &mut Vec<Problem>) {
    let mut index: HashMap<&str, NodeIndex> = HashMap::with_capacity(steps.len());
    let mut graph: DiGraph<usize, ()> = DiGraph::with_capacity(steps.len(), steps.len());
    let mut duplicates: BTreeMap<&str, usize> = BTreeMap::new();
    for (position, step) in steps.iter().enumerate() {
        let node = graph.add_node(position);
        if index.insert(step.id.as_str(), node).is_some() {
            *duplicates.entry(step.id.as_str()).or_insert(1) += 1;
        }
    }
    for (id, count) in &duplicates {
        problems.push(problem(
            "steps",
            format!("the id {id:?} is used by {count} steps"),
        ));
    }
    if !duplicates.is_empty() {
        return;
    }
    for (position, step) in steps.iter().enumerate() {
        let child = NodeIndex::new(position);
        for parent in &step.depends_on {
            match index.get(parent.as_str()) {
                None => problems.push(problem(
                    format!("steps[{position}] ({}).depends_on", step.id),
                    format!("depends on {parent:?}, which is not a step"),
                )),
                Some(&node) if node == child => problems.push(problem(
                    format!("steps[{position}] ({}).depends_on", step.id),
                    "a step cannot depend on itself",
                )),
                Some(&node) => {
                    graph.update_edge(node, child, ());
                }
            }
        }
    }
    let order = match petgraph::algo::toposort(&graph, None) {
        Ok(order) => order,
        Err(_) => {
            // Name every cycle's members, in the order they were written.
            for component in petgraph::algo::kosaraju_scc(&graph) {
                if component.len() > 1 {
                    let mut members: Vec<usize> = component.iter().map(|n| graph[*n]).collect();
                    members.sort_unstable();
                    let names: Vec<&str> = members.iter().map(|&p| steps[p].id.as_str()).collect();
                    problems.push(problem(
                        "steps",
                        format!("a cycle runs through {}", names.join(", ")),
                    ));
                }
            }
            return;
        }
    };
    // Ancestor sets, as bit sets filled in topological order (iterative; a 10,000-step chain
    // is 10,000 × 157 words).
    let words = steps.len().div_ceil(64);
    let mut ancestors = vec![0u64; steps.len() * words];
    for node in &order {
        let position = graph[*node];
        for parent in graph.neighbors_directed(*node, petgraph::Direction::Incoming) {
            let parent = graph[parent];
            ancestors[position * words + parent / 64] |= 1 << (parent % 64);
            for word in 0..words {
                let inherited = ancestors[parent * words + word];
                ancestors[position * words + word] |= inherited;
            }
        }
    }
    let is_ancestor = |of: usize, candidate: usize| {
        ancestors[of * words + candidate / 64] & (1 << (candidate % 64)) != 0
    };
    // The problems of one reference read by `step` (at `position`; `None`: the failure step,
    // which may read any step).
    let check = |at: &str, step: &Step, position: Option<usize>, reference: &Reference| {
        let mut found = Vec::new();
        if matches!(reference, Reference::Item(_) | Reference::Index) && step.for_each.is_none() {
            found.push(problem(at, "item and index exist in for_each steps only"));
        }
        if matches!(reference, Reference::Failure(_)) && position.is_some() {
            found.push(problem(at, "failure exists in the on_failure step only"));
        }
        let Some(read) = reference.step() else {
            return found;
        };
        match (index.get(read), position) {
            (None, _) => found.push(problem(at, format!("reads step {read:?}, which is not a step"))),
            (Some(&node), Some(position)) if !is_ancestor(position, graph[node]) => found.push(problem(
                at,
                format!("reads step {read:?}, which is not among this step's ancestors (add it to depends_on)"),
            )),
            _ => {}
        }
        found
    };
    let all = steps
        .iter()
        .enumerate()
        .map(|(p, s)| (Some(p), s))
        .chain(on_failure.map(|s| (None, s)));
    for (position, step) in all {
        let at = match position {
            Some(p) => format!("steps[{p}] ({})", step.id),
            None => "on_failure".to_string(),
        };
        for template in templates(&step.spec) {
            match template {
                Ok(reference) => {
                    problems.extend(check(&format!("{at}.spec"), step, position, &reference))
                }
                Err(message) => problems.push(problem(format!("{at}.spec"), message)),
            }
        }
        if let Some(condition) = &step.condition {
            problems.extend(check(
                &format!("{at}.if"),
                step,
                position,
                condition.reference(),
            ));
        }
        if let Some(list) = &step.for_each {
            if matches!(
                list,
                Reference::Item(_) | Reference::Index | Reference::Failure(_)
            ) {
                problems.push(problem(
                    format!("{at}.for_each"),
                    "must read input or a step",
                ));
            } else {
                problems.extend(check(&format!("{at}.for_each"), step, position, list));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        parse(text, "wf")
            .err()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_diamond_in_yaml_or_json_is_read_with_its_parts() {
        let yaml = r#"
steps:
  - {id: a, kind: noop}
  - id: b
    depends_on: [a]
    kind: bash
    script: "echo {{ steps.a.output.value }} {{ input.who }}"
    retry: {max_attempts: 5, initial_ms: 10}
  - {id: c, depends_on: [a], kind: noop, if: "steps.a.output.value.go == true"}
  - {id: d, depends_on: [b, c], kind: noop, for_each: "steps.b.output.value.items"}
on_failure: {id: alert, kind: noop}
"#;
        let definition = parse(yaml, "wf").unwrap();
        assert_eq!(definition.steps.len(), 4);
        assert_eq!(definition.steps[1].retry.unwrap().max_attempts, Some(5));
        assert_eq!(
            definition.steps[2].condition,
            Some(Condition::Equals(
                Reference::Step(
                    "a".into(),
                    vec![Segment::Key("value".into()), Segment::Key("go".into())]
                ),
                Value::Bool(true)
            ))
        );
        assert_eq!(definition.canonical["name"], "wf");
        let json = serde_json::to_string(&definition.canonical).unwrap();
        let again = parse(&json, "wf").unwrap();
        assert_eq!(again.canonical, definition.canonical, "JSON reads the same");
    }

    #[test]
    fn every_graph_problem_is_named() {
        let found =
            problems("steps: [{id: a, kind: noop}, {id: a, kind: noop}, {id: b, kind: noop}]");
        assert_eq!(found, ["steps: the id \"a\" is used by 2 steps"]);
        let found =
            problems("steps: [{id: a, kind: noop, depends_on: [a, ghost]}, {id: b, kind: noop}]");
        assert!(
            found.iter().any(|p| p.contains("cannot depend on itself")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.contains("\"ghost\", which is not a step")),
            "{found:?}"
        );
        let found = problems(
            "steps: [{id: a, kind: noop, depends_on: [c]}, {id: b, kind: noop, depends_on: [a]},
                     {id: c, kind: noop, depends_on: [b]}, {id: d, kind: noop}]",
        );
        assert_eq!(found, ["steps: a cycle runs through a, b, c"]);
        let found = problems(
            "steps: [{id: a, kind: noop}, {id: b, kind: bash, script: '{{ steps.a.output }}'}]",
        );
        assert!(
            found[0].contains("not among this step's ancestors"),
            "{found:?}"
        );
        let found = problems("steps: [{id: a, kind: bash, script: '{{ item.x }}'}]");
        assert!(found[0].contains("for_each steps only"), "{found:?}");
        let found = problems(
            "steps: [{id: a, kind: bash, script: 'echo [1]', artifacts: [out]},
                     {id: b, depends_on: [a], kind: bash, script: 'true',
                      for_each: steps.a.output.value, artifacts: [x]}]",
        );
        assert!(
            found[0].contains("for_each step cannot declare"),
            "{found:?}"
        );
        let found = problems("steps: [{id: a, kind: teleport}]");
        assert!(found[0].starts_with("steps[0] (a).spec"), "{found:?}");
        let found = problems("steps: []");
        assert!(found[0].contains("at least one step"), "{found:?}");
        let found = problems("steps:\n  - id: a\n    kind: noop\n   bad: [");
        assert!(found[0].starts_with("line "), "{found:?}");
        let found = problems("steps: [{id: a, kind: noop, depends_on: 7}]");
        assert!(found[0].starts_with("steps[0].depends_on"), "{found:?}");
        let found =
            problems("steps: [{id: a, kind: bash, script: x, artifacts: ['../x', '/etc']}]");
        assert_eq!(found.len(), 2, "{found:?}");
        let found = problems("name: other\nsteps: [{id: a, kind: noop}]");
        assert!(found[0].contains("registered as \"wf\""), "{found:?}");
    }

    #[test]
    fn the_example_workflows_are_valid() {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut checked = 0;
        for entry in std::fs::read_dir(examples).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let name = path.file_stem().unwrap().to_string_lossy();
                if let Err(problems) = parse(&text, &name) {
                    panic!("{}: {problems:?}", path.display());
                }
                checked += 1;
            }
        }
        assert!(checked > 0);
    }

    #[test]
    fn ten_thousand_steps_validate_fast_and_without_recursion() {
        let mut steps = vec![serde_json::json!({"id": "s0", "kind": "noop"})];
        for i in 1..MAX_STEPS {
            steps.push(serde_json::json!({
                "id": format!("s{i}"),
                "depends_on": [format!("s{}", i - 1)],
                "kind": "bash",
                "script": format!("echo {{{{ steps.s0.output.x }}}} {i}"),
            }));
        }
        let text = serde_json::json!({ "steps": steps }).to_string();
        let started = std::time::Instant::now();
        let definition = parse(&text, "chain").unwrap();
        assert_eq!(definition.steps.len(), MAX_STEPS);
        // A generous bound for a debug build on a loaded machine; release takes milliseconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let cycle = text.replacen("\"depends_on\":[\"s0\"]", "\"depends_on\":[\"s9999\"]", 1);
        assert!(problems(&cycle)[0].contains("a cycle runs through"));
    }

    #[test]
    fn acceptance_is_exactly_acyclicity_over_random_graphs() {
        // Property: a definition over closed, unique ids is accepted iff its graph is
        // acyclic (checked against a plain Kahn count).
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let n = rng.usize(1..12);
            let mut edges = Vec::new();
            for child in 0..n {
                for parent in 0..n {
                    if parent != child && rng.u8(..) < 40 {
                        edges.push((parent, child));
                    }
                }
            }
            let mut indegree = vec![0; n];
            for &(_, c) in &edges {
                indegree[c] += 1;
            }
            let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
            let mut seen = 0;
            while let Some(node) = ready.pop() {
                seen += 1;
                for &(p, c) in &edges {
                    if p == node {
                        indegree[c] -= 1;
                        if indegree[c] == 0 {
                            ready.push(c);
                        }
                    }
                }
            }
            let acyclic = seen == n;
            let steps: Vec<Value> = (0..n)
                .map(|i| {
                    let parents: Vec<String> = edges
                        .iter()
                        .filter(|&&(_, c)| c == i)
                        .map(|&(p, _)| format!("s{p}"))
                        .collect();
                    serde_json::json!({"id": format!("s{i}"), "kind": "noop", "depends_on": parents})
                })
                .collect();
            let text = serde_json::json!({ "steps": steps }).to_string();
            assert_eq!(parse(&text, "r").is_ok(), acyclic, "{text}");
        }
    }
}
