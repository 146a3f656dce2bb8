//! `{{ reference }}` in the string fields of a step's spec, filled from the step's context
//! when its job is claimed — so any runner version runs it, and a reference that does not
//! resolve fails the step with `template_error` naming the path. A string value is inserted
//! as it is, anything else as JSON.

use serde_json::Value;

use super::definition::parse_reference;

/// `spec` with every template filled from `context`; the message names the first reference
/// that does not resolve.
pub fn render(spec: &Value, context: &Value) -> Result<Value, String> {
    match spec {
        Value::String(text) if text.contains("{{") => render_text(text, context).map(Value::String),
        Value::Array(items) => items
            .iter()
            .map(|item| render(item, context))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| Ok((key.clone(), render(value, context)?)))
            .collect::<Result<_, String>>()
            .map(Value::Object),
        other => Ok(other.clone()),
    }
}

fn render_text(text: &str, context: &Value) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .ok_or_else(|| format!("a '{{{{' in {text:?} is not closed"))?;
        let expression = rest[start + 2..start + end].trim();
        let reference = parse_reference(expression)?;
        let path = reference.path();
        let value = path
            .iter()
            .try_fold(context, |at, key| match at {
                Value::Object(map) => map.get(key),
                Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            })
            .ok_or_else(|| format!("{expression} does not resolve"))?;
        match value {
            Value::String(s) => out.push_str(s),
            other => out.push_str(&other.to_string()),
        }
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_fill_strings_and_name_what_does_not_resolve() {
        let context = json!({
            "input": {"who": "ada", "n": 3},
            "steps": {"fetch": {"output": {"value": {"items": [1, {"k": "v"}], "file": "a.csv"}}}},
            "item": "x",
            "index": 2,
        });
        let spec = json!({
            "kind": "bash",
            "script": "echo {{ input.who }} {{input.n}} {{ steps.fetch.output.value.items }} {{ steps.fetch.output.value.items[1].k }} {{ item }}{{ index }}",
            "env": {"FILE": "{{ steps.fetch.output.value.file }}"},
            "timeout_ms": 5,
        });
        let rendered = render(&spec, &context).unwrap();
        assert_eq!(rendered["script"], "echo ada 3 [1,{\"k\":\"v\"}] v x2");
        assert_eq!(rendered["env"]["FILE"], "a.csv");
        assert_eq!(rendered["timeout_ms"], 5);
        let missing = json!({"kind": "bash", "script": "{{ steps.fetch.output.value.nope }}"});
        assert_eq!(
            render(&missing, &context).unwrap_err(),
            "steps.fetch.output.value.nope does not resolve"
        );
        let out_of_range = json!({"script": "{{ steps.fetch.output.value.items[9] }}"});
        assert!(render(&out_of_range, &context).is_err());
    }
}
