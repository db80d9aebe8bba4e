//! The access policy: every gRPC method and every HTTP route, and who may call it.
//! Both listeners read these tables (the gRPC auth layer and the HTTP listener's
//! route layer), and both refuse what the tables do not list. When the coordinator
//! runs without tokens (the embedded default), nothing is checked.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Submit, cancel their own experiments, status, watch, report, SQL.
    Researcher,
    /// Register, lease, heartbeat, metrics, checkpoints, completion: nothing else.
    Worker,
    /// Everything, token management and cancelling anyone's experiment included.
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "researcher" => Some(Role::Researcher),
            "worker" => Some(Role::Worker),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Researcher => "researcher",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }
}

/// Who may call a method or route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed: the dashboard's page and assets, login, health and metrics.
    Anyone,
    /// A token of one of these roles.
    Roles(&'static [Role]),
}

/// Researchers and admins: experiments, reports, queries, the dashboard's API.
pub const RESEARCH: Access = Access::Roles(&[Role::Researcher, Role::Admin]);
/// Workers and admins: the lease protocol.
pub const WORK: Access = Access::Roles(&[Role::Worker, Role::Admin]);
/// Admins alone: tokens, draining workers, the reader's credentials.
pub const ADMIN: Access = Access::Roles(&[Role::Admin]);

/// Every gRPC method, by path.
pub const GRPC: &[(&str, Access)] = &[
    ("/ablate.v1.Experiments/Submit", RESEARCH),
    ("/ablate.v1.Experiments/GetExperiment", RESEARCH),
    ("/ablate.v1.Experiments/ListExperiments", RESEARCH),
    ("/ablate.v1.Experiments/Cancel", RESEARCH),
    ("/ablate.v1.Experiments/Watch", RESEARCH),
    ("/ablate.v1.Experiments/ListWorkers", RESEARCH),
    ("/ablate.v1.Experiments/DrainWorker", ADMIN),
    ("/ablate.v1.Experiments/Query", RESEARCH),
    ("/ablate.v1.Experiments/Report", RESEARCH),
    ("/ablate.v1.Experiments/ReaderUrl", ADMIN),
    ("/ablate.v1.Experiments/Dashboard", RESEARCH),
    ("/ablate.v1.Experiments/CreateToken", ADMIN),
    ("/ablate.v1.Experiments/ListTokens", ADMIN),
    ("/ablate.v1.Experiments/RevokeToken", ADMIN),
    ("/ablate.v1.Experiments/SetTokenWeight", ADMIN),
    ("/ablate.v1.Experiments/TrialLogs", RESEARCH),
    ("/ablate.v1.Experiments/Retry", RESEARCH),
    ("/ablate.v1.Experiments/Tag", RESEARCH),
    ("/ablate.v1.Experiments/Note", RESEARCH),
    ("/ablate.v1.Experiments/Delete", RESEARCH),
    ("/ablate.v1.Experiments/CollectGarbage", ADMIN),
    ("/ablate.v1.Workers/Register", WORK),
    ("/ablate.v1.Workers/Lease", WORK),
    ("/ablate.v1.Workers/Heartbeat", WORK),
    ("/ablate.v1.Workers/StreamMetrics", WORK),
    ("/ablate.v1.Workers/ReportCheckpoint", WORK),
    ("/ablate.v1.Workers/Complete", WORK),
    ("/ablate.v1.Workers/CompleteMany", WORK),
    ("/ablate.v1.Workers/Release", WORK),
];

/// Every HTTP route, by its pattern as the router registers it.
pub const HTTP: &[(&str, Access)] = &[
    ("/", Access::Anyone),
    ("/assets/{file}", Access::Anyone),
    ("/login", Access::Anyone),
    ("/logout", Access::Anyone),
    ("/metrics", Access::Anyone),
    ("/healthz", Access::Anyone),
    ("/readyz", Access::Anyone),
    ("/api/v1/experiments", RESEARCH),
    ("/api/v1/experiments/{id}", RESEARCH),
    ("/api/v1/experiments/{id}/trials", RESEARCH),
    ("/api/v1/experiments/{id}/curves", RESEARCH),
    ("/api/v1/experiments/{id}/report", RESEARCH),
    ("/api/v1/experiments/{id}/cancel", RESEARCH),
    ("/api/v1/experiments/{id}/retry", RESEARCH),
    ("/api/v1/experiments/{id}/tags", RESEARCH),
    ("/api/v1/experiments/{id}/note", RESEARCH),
    ("/api/v1/sql", RESEARCH),
    ("/api/v1/trials/{id}", RESEARCH),
    ("/api/v1/trials/{id}/curves", RESEARCH),
    ("/api/v1/trials/{id}/logs", RESEARCH),
    ("/api/v1/workers", RESEARCH),
    ("/api/v1/{*rest}", RESEARCH),
];

/// Who may hold a dashboard session (`/login`): whoever may read the API.
pub const DASHBOARD_SESSION: Access = RESEARCH;

/// The rule for a gRPC method; `None`: not in the policy, so refused.
pub fn grpc(path: &str) -> Option<Access> {
    GRPC.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// The rule for an HTTP route pattern; `None`: not in the policy, so refused.
pub fn http(route: &str) -> Option<Access> {
    HTTP.iter().find(|(p, _)| *p == route).map(|(_, a)| *a)
}

/// Whether the policy lets `role` through, and if not, the roles that may.
pub fn check(access: Access, role: Role) -> Result<(), &'static [Role]> {
    match access {
        Access::Anyone => Ok(()),
        Access::Roles(roles) if roles.contains(&role) => Ok(()),
        Access::Roles(roles) => Err(roles),
    }
}

/// The roles' names joined for a message: "researcher or admin".
pub fn names(roles: &[Role]) -> String {
    roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(" or ")
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Every method of every service in the compiled protocol has an entry, and every
    /// entry names a method that exists.
    #[test]
    fn every_grpc_method_has_an_entry_and_every_entry_a_method() {
        let set = prost_types::FileDescriptorSet::decode(ablate_schema::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
        assert!(methods.len() >= 20, "{methods:?}");
        assert_covers(&methods, GRPC, "methods");
    }

    /// Every one of `found` has a rule in `table`, and every rule one of `found`.
    fn assert_covers(found: &[String], table: &[(&str, Access)], what: &str) {
        let missing: Vec<&String> = found.iter().filter(|f| !table.iter().any(|(p, _)| p == f)).collect();
        assert!(missing.is_empty(), "{what} without an access rule: {missing:?}");
        let stale: Vec<&str> = table
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| !found.iter().any(|f| f == p))
            .collect();
        assert!(stale.is_empty(), "rules for {what} that do not exist: {stale:?}");
    }

    /// Every route the coordinator's sources register has an entry, and every entry is
    /// registered somewhere.
    #[test]
    fn every_http_route_has_an_entry_and_every_entry_a_route() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut routes = Vec::new();
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("policy.rs") {
                    routes.extend(registered_routes(&std::fs::read_to_string(&path).unwrap()));
                }
            }
        }
        assert!(routes.len() >= 15, "{routes:?}");
        assert_covers(&routes, HTTP, "routes");
    }

    /// The string literal after each `.route(` in a source file.
    fn registered_routes(source: &str) -> Vec<String> {
        source
            .split(".route(")
            .skip(1)
            .filter_map(|rest| {
                let rest = rest.trim_start().strip_prefix('"')?;
                Some(rest[..rest.find('"')?].to_string())
            })
            .collect()
    }

    /// What only an admin may do, written out apart from the table.
    const ADMIN_ONLY: &[&str] = &[
        "DrainWorker",
        "ReaderUrl",
        "CreateToken",
        "ListTokens",
        "RevokeToken",
        "SetTokenWeight",
        "CollectGarbage",
    ];

    #[test]
    fn researchers_reach_no_admin_method_and_workers_only_the_lease_protocol() {
        for (path, access) in GRPC {
            let researcher = check(*access, Role::Researcher).is_ok();
            let worker = check(*access, Role::Worker).is_ok();
            let method = path.rsplit('/').next().unwrap();
            assert!(check(*access, Role::Admin).is_ok(), "{path}");
            assert_eq!(worker, path.starts_with("/ablate.v1.Workers/"), "{path}");
            assert_eq!(
                researcher,
                path.starts_with("/ablate.v1.Experiments/") && !ADMIN_ONLY.contains(&method),
                "{path}: researchers reach the research methods and nothing else"
            );
        }
        for method in ADMIN_ONLY {
            let path = format!("/ablate.v1.Experiments/{method}");
            assert_eq!(grpc(&path), Some(ADMIN), "{path}");
        }
        for (route, access) in HTTP {
            let open = route.starts_with("/api/") || matches!(*access, Access::Anyone);
            assert!(open, "{route}");
            assert!(
                check(*access, Role::Worker).is_err() || *access == Access::Anyone,
                "{route}"
            );
        }
        assert_eq!(check(ADMIN, Role::Researcher), Err(&[Role::Admin][..]));
        assert_eq!(grpc("/ablate.v1.Experiments/NoSuchMethod"), None);
        assert_eq!(names(&[Role::Researcher, Role::Admin]), "researcher or admin");
    }
}
