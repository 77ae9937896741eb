//! Apps: what the registry knows of each (schemas, limits) and input validation against its JSON Schema.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ApiError, ErrorType};

/// How an app is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppKind {
    /// A Rust model from `darkroom-models`, run in a runner process of this binary.
    Builtin,
    /// A deployed app that is its own HTTP server (a `darkroom.toml` manifest, or a `fal.App` through Darkroom's
    /// launcher), run by the runner's `http` executor.
    Http,
}

/// An app as the registry knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppSpec {
    /// `owner/alias`.
    pub id: String,
    pub title: String,
    pub description: String,
    pub kind: AppKind,
    /// Endpoint paths the app serves, relative to the app (`""` is the root).
    pub paths: Vec<String>,
    pub input_schema: Value,
    pub output_schema: Value,
    /// Scaling knobs and the resources one runner needs, as deployed (run-time changes are kept apart).
    #[serde(default)]
    pub scaling: crate::scaling::ScalingKnobs,
    /// Whether the app emits partial outputs for `/stream`.
    pub streaming: bool,
    /// What the catalog shows: category, tags, license, examples.
    #[serde(default)]
    pub catalog: CatalogInfo,
    /// How a request is metered (the unit); prices are the operator's (see [`crate::billing`]).
    #[serde(default)]
    pub billing: crate::billing::Billing,
    /// Paths (relative to the app, as in `/{app}/{path}/realtime`) where a deployed app serves fal's realtime
    /// WebSocket itself; built-in apps' realtime endpoints are on their `paths`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub realtime: Vec<String>,
}

/// Catalog metadata of an app.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CatalogInfo {
    /// fal's category names: `text-to-image`, `image-to-image`, `speech-to-text`, `text-to-speech`, `image-to-video`,
    /// … (`utility` for apps that run no model, `test` for test apps).
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The license of the weights (SPDX id where there is one); None for apps without weights.
    #[serde(default)]
    pub license: Option<String>,
    /// Example inputs, each for one endpoint path.
    #[serde(default)]
    pub examples: Vec<Example>,
}

/// An example input of an endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// The endpoint path within the app (`""` is the root).
    #[serde(default)]
    pub path: String,
    pub title: String,
    pub input: Value,
}

/// An app with its input validator compiled once.
pub struct CompiledApp {
    pub spec: AppSpec,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for CompiledApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledApp").field("id", &self.spec.id).finish()
    }
}

impl CompiledApp {
    pub fn compile(spec: AppSpec) -> Result<CompiledApp, String> {
        let validator =
            jsonschema::validator_for(&spec.input_schema).map_err(|e| format!("input schema of {}: {e}", spec.id))?;
        Ok(CompiledApp { spec, validator })
    }

    /// Validates an input; on failure returns a 422 with a FastAPI-style `detail` list, one entry per failing field.
    pub fn validate(&self, input: &Value) -> Result<(), ApiError> {
        let mut detail = Vec::new();
        for err in self.validator.iter_errors(input) {
            push_error(&err, &mut detail);
            if detail.len() >= 50 {
                detail.truncate(50);
                break;
            }
        }
        if detail.is_empty() { Ok(()) } else { Err(validation_error(detail)) }
    }

    /// Whether the app serves this endpoint path.
    pub fn has_path(&self, path: &str) -> bool {
        self.spec.paths.iter().any(|p| p == path)
    }
}

/// Adds one validation error to a FastAPI `detail` list. A value that matches none of the alternatives of an
/// `anyOf`/`oneOf` (`image_size`: a name or `{width, height}`) is explained by the one alternative of its own JSON
/// type, when there is exactly one: `["body", "image_size", "width"]: 100 is not a multiple of 8` rather than "not
/// valid under any of the schemas"; alternatives that are all constants (an enum with documented values) list them.
fn push_error(err: &jsonschema::ValidationError<'_>, detail: &mut Vec<Value>) {
    use jsonschema::error::ValidationErrorKind as Kind;
    let here = err.instance_path().as_str();
    let mut msg = err.to_string();
    let mut kind = err.kind().keyword().to_string();
    if let Kind::AnyOf { context } | Kind::OneOfNotValid { context } = err.kind() {
        let same_type: Vec<_> = context.iter().filter(|branch| !wrong_type(branch, here)).collect();
        if let [branch] = same_type.as_slice()
            && !branch.is_empty()
        {
            for e in branch.iter() {
                push_error(e, detail);
            }
            return;
        }
        let consts: Option<Vec<String>> = context
            .iter()
            .map(|branch| match branch.as_slice() {
                [e] if e.instance_path().as_str() == here => match e.kind() {
                    Kind::Constant { expected_value } => Some(expected_value.to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        if let Some(consts) = consts.filter(|c| !c.is_empty()) {
            msg = format!("{} is not one of {}", err.instance(), consts.join(", "));
            kind = "enum".into();
        }
    }
    let mut loc = vec![json!("body")];
    for seg in err.instance_path() {
        loc.push(match seg {
            jsonschema::paths::LocationSegment::Property(p) => json!(p.as_ref()),
            jsonschema::paths::LocationSegment::Index(i) => json!(i),
        });
    }
    detail.push(json!({"loc": loc, "msg": msg, "type": kind}));
}

/// Whether an alternative's errors say the value at `here` has the wrong JSON type for it (directly, or for every
/// alternative nested in it).
fn wrong_type(errors: &[jsonschema::ValidationError<'_>], here: &str) -> bool {
    use jsonschema::error::ValidationErrorKind as Kind;
    errors.iter().any(|e| {
        e.instance_path().as_str() == here
            && match e.kind() {
                Kind::Type { .. } => true,
                Kind::AnyOf { context } | Kind::OneOfNotValid { context } => {
                    !context.is_empty() && context.iter().all(|b| wrong_type(b, here))
                }
                _ => false,
            }
    })
}

/// A 422 with the given FastAPI `detail` list.
pub fn validation_error(detail: Vec<Value>) -> ApiError {
    ApiError::new(ErrorType::ValidationError, "Input validation failed").with_detail(Value::Array(detail))
}

/// A 422 for a body that is not JSON, in FastAPI's shape.
pub fn json_decode_error(msg: &str) -> ApiError {
    validation_error(vec![json!({"loc": ["body"], "msg": format!("JSON decode error: {msg}"), "type": "json_invalid"})])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> CompiledApp {
        CompiledApp::compile(AppSpec {
            id: "t/app".into(),
            title: "t".into(),
            description: String::new(),
            kind: AppKind::Builtin,
            paths: vec!["".into()],
            input_schema: json!({
                "type": "object",
                "properties": {"n": {"type": "integer", "minimum": 0}, "xs": {"type": "array", "items": {"type": "string"}}},
                "required": ["n"]
            }),
            output_schema: json!({}),
            scaling: Default::default(),
            streaming: false,
            catalog: Default::default(),
            billing: Default::default(),
            realtime: vec![],
        })
        .unwrap()
    }

    #[test]
    fn validation_lists_every_field() {
        let a = app();
        assert!(a.validate(&json!({"n": 1})).is_ok());
        let e = a.validate(&json!({"n": -1, "xs": ["a", 2]})).unwrap_err();
        assert_eq!(e.status, 422);
        let d = e.detail.unwrap();
        let locs: Vec<_> = d.as_array().unwrap().iter().map(|x| x["loc"].clone()).collect();
        assert!(locs.contains(&json!(["body", "n"])), "{locs:?}");
        assert!(locs.contains(&json!(["body", "xs", 1])), "{locs:?}");
        let e = a.validate(&json!({})).unwrap_err();
        assert_eq!(e.detail.unwrap()[0]["type"], "required");
    }

    #[test]
    fn alternatives_are_explained_by_the_one_of_the_values_type() {
        let mut spec = app().spec;
        spec.input_schema = json!({"type": "object", "properties": {"size": {"anyOf": [
            {"anyOf": [
                {"oneOf": [{"type": "string", "const": "square"}, {"type": "string", "const": "portrait"}]},
                {"type": "object", "properties": {"width": {"type": "integer", "multipleOf": 8}}, "required": ["width"]}
            ]},
            {"type": "null"}
        ]}}});
        let a = CompiledApp::compile(spec).unwrap();
        assert!(a.validate(&json!({"size": "square"})).is_ok());
        assert!(a.validate(&json!({"size": {"width": 64}})).is_ok());
        assert!(a.validate(&json!({"size": null})).is_ok());
        let d = a.validate(&json!({"size": {"width": 100}})).unwrap_err().detail.unwrap();
        assert_eq!(d[0]["loc"], json!(["body", "size", "width"]), "{d}");
        assert_eq!(d[0]["type"], "multipleOf", "{d}");
        let d = a.validate(&json!({"size": "huge"})).unwrap_err().detail.unwrap();
        assert_eq!((d[0]["loc"].clone(), d[0]["type"].clone()), (json!(["body", "size"]), json!("enum")), "{d}");
        assert_eq!(d[0]["msg"], "\"huge\" is not one of \"square\", \"portrait\"", "{d}");
        // A value of a type no alternative takes keeps the general message.
        let d = a.validate(&json!({"size": 3})).unwrap_err().detail.unwrap();
        assert_eq!(d[0]["type"], "anyOf", "{d}");
    }
}
