//! `GET /openapi.json`: the public API's OpenAPI 3.1 document, generated from the handlers'
//! `#[utoipa::path]` annotations (in [`super::public`]) and the protocol crate's types (their
//! `ToSchema`, behind its `openapi` feature). The responses every route shares — a malformed
//! or invalid request, a missing token, a body too large, the database away — and the bearer
//! scheme are added here, once.

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::public;
use sluice_protocol::api::paths;
use sluice_protocol::ErrorBody;

/// Routes anyone may call: probes and this document.
pub const OPEN_ROUTES: [&str; 3] = [paths::HEALTHZ, paths::READYZ, paths::OPENAPI];

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sluice",
        description = "The public API of the sluice job system: enqueue and follow jobs, workflows, \
                       runs, schedules, queues and runners. Every route but the probes and this \
                       document needs `Authorization: Bearer <SLUICE_API_TOKEN>`. Errors are \
                       `{\"error\":{\"code\",\"message\"}}`."
    ),
    paths(
        public::enqueue,
        public::list_jobs,
        public::enqueue_batch,
        public::retry_jobs,
        public::get_job,
        public::job_events,
        public::cancel_job,
        public::retry_job,
        public::list_queues,
        public::pause_queue,
        public::resume_queue,
        public::register_workflow,
        public::get_workflow,
        public::list_workflows,
        public::start_run,
        public::list_runs,
        public::get_run,
        public::run_events,
        public::cancel_run,
        public::run_artifacts,
        public::list_schedules,
        public::put_schedule,
        public::get_schedule,
        public::delete_schedule,
        public::pause_schedule,
        public::resume_schedule,
        public::list_runners,
        public::get_session,
        public::delete_session,
        public::metrics,
        public::readyz,
        super::healthz,
        openapi_json,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Shared)
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = paths::OPENAPI,
    tag = "operations",
    responses((status = 200, description = "This document", body = Object))
)]
pub async fn openapi_json() -> axum::Json<Document> {
    axum::Json(document())
}

/// The document (built once per call; it is small).
pub fn document() -> Document {
    ApiDoc::openapi()
}

/// The bearer scheme, and the responses every route can give.
struct Shared;

impl Modify for Shared {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("SLUICE_API_TOKEN"))
                    .build(),
            ),
        );
        components
            .schemas
            .entry(ErrorBody::name().into_owned())
            .or_insert_with(<ErrorBody as utoipa::PartialSchema>::schema);
        for (path, item) in doc.paths.paths.iter_mut() {
            let open = OPEN_ROUTES.contains(&path.as_str());
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                shared_responses(operation, open);
            }
        }
    }
}

fn shared_responses(operation: &mut Operation, open: bool) {
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                    .build(),
            )
            .build()
    };
    let mut shared = vec![
        ("500", "An error of the scheduler's own"),
        ("503", "The database is unreachable (with Retry-After)"),
    ];
    if !open {
        operation.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
        shared.extend([
            (
                "400",
                "Malformed JSON, or a field out of its range (named in the message)",
            ),
            ("401", "A missing or wrong API token"),
            ("413", "The body is larger than the route accepts"),
        ]);
    }
    for (status, description) in shared {
        operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| error(description).into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_public_path_constant_is_documented() {
        let doc = document();
        let documented: Vec<&String> = doc.paths.paths.keys().collect();
        for path in [
            paths::JOBS,
            paths::JOBS_BATCH,
            paths::JOBS_RETRY,
            paths::JOB_ROUTE,
            paths::JOB_EVENTS_ROUTE,
            paths::JOB_CANCEL_ROUTE,
            paths::JOB_RETRY_ROUTE,
            paths::QUEUES,
            paths::QUEUE_PAUSE_ROUTE,
            paths::QUEUE_RESUME_ROUTE,
            paths::WORKFLOWS,
            paths::WORKFLOW_ROUTE,
            paths::WORKFLOWS_RUN,
            paths::RUNS,
            paths::RUN_ROUTE,
            paths::RUN_EVENTS_ROUTE,
            paths::RUN_CANCEL_ROUTE,
            paths::RUN_ARTIFACTS_ROUTE,
            paths::SCHEDULES,
            paths::SCHEDULE_ROUTE,
            paths::SCHEDULE_PAUSE_ROUTE,
            paths::SCHEDULE_RESUME_ROUTE,
            paths::RUNNERS,
            paths::SESSION_ROUTE,
            paths::METRICS,
            paths::HEALTHZ,
            paths::READYZ,
            paths::OPENAPI,
        ] {
            assert!(
                documented.iter().any(|d| *d == path),
                "{path} is not in /openapi.json"
            );
        }
        assert!(!documented.iter().any(|d| d.starts_with("/internal")));
    }

    #[test]
    fn every_reference_resolves_and_every_operation_answers_errors_as_error_bodies() {
        let doc = serde_json::to_value(document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for reference in text.split("\"$ref\":\"").skip(1) {
            let target = reference.split('"').next().unwrap();
            let name = target
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("a reference outside the schemas: {target}"));
            assert!(schemas.contains_key(name), "{target} does not resolve");
        }
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let responses = operation["responses"].as_object().unwrap();
                assert!(responses.contains_key("503"), "{method} {path}");
                let open = OPEN_ROUTES.contains(&path.as_str());
                assert_eq!(responses.contains_key("401"), !open, "{method} {path}");
                assert_eq!(
                    operation.get("security").is_some(),
                    !open,
                    "{method} {path}"
                );
            }
        }
    }
}
