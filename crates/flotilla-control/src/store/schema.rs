//! The schema, as numbered migrations applied in order. Every statement is
//! written in the SQL that SQLite and PostgreSQL share (`$n` parameters,
//! BIGINT and TEXT columns, JSON kept as TEXT), so both run one code path.

/// `(version, statements)`; append only, never edit an applied one.
pub(crate) const MIGRATIONS: &[(i64, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE tenants (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at BIGINT NOT NULL)",
            "CREATE TABLE tokens (
            id TEXT PRIMARY KEY,
            secret_hash TEXT NOT NULL UNIQUE,
            tenant_id TEXT REFERENCES tenants(id),
            admin BIGINT NOT NULL,
            description TEXT,
            created_at BIGINT NOT NULL)",
            "CREATE TABLE hosts (
            name TEXT PRIMARY KEY,
            endpoint TEXT NOT NULL,
            vcpus BIGINT NOT NULL,
            memory_mib BIGINT NOT NULL,
            labels TEXT NOT NULL,
            down BIGINT NOT NULL,
            cordoned BIGINT NOT NULL,
            last_heartbeat BIGINT NOT NULL,
            registered_at BIGINT NOT NULL,
            version BIGINT NOT NULL)",
            "CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL REFERENCES tenants(id),
            name TEXT NOT NULL,
            host TEXT,
            desired TEXT NOT NULL,
            observed TEXT NOT NULL,
            image TEXT,
            vcpus BIGINT NOT NULL,
            memory_mib BIGINT NOT NULL,
            ip TEXT,
            tags TEXT NOT NULL,
            operation TEXT,
            last_error TEXT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            UNIQUE (tenant_id, name))",
            "CREATE INDEX instances_by_host ON instances (host)",
            "CREATE TABLE operations (
            id TEXT PRIMARY KEY,
            tenant_id TEXT,
            kind TEXT NOT NULL,
            targets TEXT NOT NULL,
            state TEXT NOT NULL,
            steps TEXT NOT NULL,
            input TEXT NOT NULL,
            error TEXT,
            lease_owner TEXT,
            lease_until BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL)",
            "CREATE INDEX operations_by_state ON operations (state)",
            "CREATE TABLE idempotency_keys (
            tenant_id TEXT NOT NULL,
            key TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            status BIGINT NOT NULL,
            response TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (tenant_id, key))",
        ],
    ),
    (
        2,
        &[
            // tenant_id '' holds the global policies.
            "CREATE TABLE policies (
            tenant_id TEXT NOT NULL,
            name TEXT NOT NULL,
            fleet TEXT NOT NULL,
            document TEXT NOT NULL,
            updated_at BIGINT NOT NULL,
            PRIMARY KEY (tenant_id, name))",
        ],
    ),
    (
        3,
        &[
            // Tags as rows too, indexed: tag filters and placement groups
            // look them up instead of scanning every instance's JSON.
            "CREATE TABLE instance_tags (
            instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (instance_id, key))",
            "CREATE INDEX instance_tags_by_pair ON instance_tags (key, value)",
        ],
    ),
    (
        4,
        &[
            // A version per placement group (a tenant's instances sharing a
            // tag value): placements under a group limit commit only if no
            // other placement in the group got there first, on any host.
            "CREATE TABLE placement_groups (
            tenant_id TEXT NOT NULL,
            tag TEXT NOT NULL,
            value TEXT NOT NULL,
            version BIGINT NOT NULL,
            PRIMARY KEY (tenant_id, tag, value))",
        ],
    ),
    (
        5,
        &[
            // A host token may only heartbeat as its host (agents need no
            // admin power).
            "ALTER TABLE tokens ADD COLUMN host TEXT",
        ],
    ),
    (
        6,
        &[
            // The agent's own API token, from its heartbeats: the control
            // plane's calls to the agent carry it.
            "ALTER TABLE hosts ADD COLUMN agent_token TEXT",
        ],
    ),
    (
        7,
        &[
            // The host an instance is being live-migrated to: it holds
            // capacity there too until the move ends.
            "ALTER TABLE instances ADD COLUMN migrating_to TEXT",
        ],
    ),
    (
        8,
        &[
            // The host's VM subnet, from its heartbeats: new instances get
            // addresses in it.
            "ALTER TABLE hosts ADD COLUMN vm_subnet TEXT",
            // Every address its VMs have (instances or not), from its
            // heartbeats: not handed out to instances elsewhere.
            "ALTER TABLE hosts ADD COLUMN vm_addresses TEXT",
            // Addresses are unique across hosts (the VM routes depend on
            // it). Duplicates reported before are forgotten, to be learnt
            // again from the next heartbeats.
            "UPDATE instances SET ip = NULL WHERE ip IN
                (SELECT ip FROM instances WHERE ip IS NOT NULL GROUP BY ip HAVING COUNT(*) > 1)",
            "CREATE UNIQUE INDEX instances_by_ip ON instances (ip)",
        ],
    ),
    (
        9,
        &[
            // The agent's TLS certificate fingerprint, from its heartbeats:
            // the control plane's calls to an HTTPS agent trust only it.
            "ALTER TABLE hosts ADD COLUMN tls_fingerprint TEXT",
        ],
    ),
    (
        10,
        &[
            // Disk space: each instance is counted for its `disk_mib`
            // against its host's capacity; the host's free space as its
            // last heartbeat measured it (0 and NULL: not reported).
            "ALTER TABLE instances ADD COLUMN disk_mib BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE hosts ADD COLUMN disk_mib BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE hosts ADD COLUMN disk_free_mib BIGINT",
        ],
    ),
    (
        11,
        &[
            // Tenants' snapshots of instances, kept by their hosts' agents
            // under the row's id.
            "CREATE TABLE snapshots (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL REFERENCES tenants(id),
                name TEXT NOT NULL,
                host TEXT NOT NULL,
                instance_name TEXT NOT NULL,
                layer TEXT NOT NULL,
                image TEXT,
                vcpus BIGINT NOT NULL,
                memory_mib BIGINT NOT NULL,
                disk_mib BIGINT NOT NULL,
                created_at BIGINT NOT NULL,
                UNIQUE (tenant_id, name)
            )",
            // The snapshot (agent name) an instance starts from.
            "ALTER TABLE instances ADD COLUMN from_snapshot TEXT",
        ],
    ),
    (
        12,
        &[
            // What a host is or can do (a JSON array), from its heartbeats.
            "ALTER TABLE hosts ADD COLUMN traits TEXT NOT NULL DEFAULT '[]'",
        ],
    ),
    (
        13,
        &[
            // Tenants' volumes, kept by their hosts' agents under the row's
            // id; attached to at most one instance.
            "CREATE TABLE volumes (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL REFERENCES tenants(id),
                name TEXT NOT NULL,
                host TEXT NOT NULL,
                size_mib BIGINT NOT NULL,
                state TEXT NOT NULL,
                attached_to TEXT,
                created_at BIGINT NOT NULL,
                UNIQUE (tenant_id, name)
            )",
            "CREATE INDEX volumes_by_instance ON volumes (attached_to)",
        ],
    ),
    (
        14,
        &[
            // A host's usage counts the instances moving to it: without an
            // index that read every instance (7.6 ms at 100,000), on the
            // path of every run.
            "CREATE INDEX instances_by_migration_target ON instances (migrating_to)
             WHERE migrating_to IS NOT NULL",
        ],
    ),
    (
        15,
        &[
            // Hosts' usage from the index alone (the fleet view's refresh
            // sums every instance by host: 3.7x faster at 100,000 than
            // through the table); it serves lookups by host as the index it
            // replaces did.
            "CREATE INDEX instances_usage_by_host ON instances (host, vcpus, memory_mib, disk_mib)",
            "DROP INDEX instances_by_host",
        ],
    ),
];
