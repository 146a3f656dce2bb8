//! The statements that set up a private cluster's application role and database (`sluice
//! dev`, the testkit, `sluice bench`), run with a superuser connection.
//!
//! The scheduler logs in as `role`, a plain login role (no superuser, no CREATEDB, no
//! CREATEROLE, no `pg_execute_server_program`) that owns its database and therefore the
//! `sluice` schema its migrations create, and nothing else: a leaked scheduler password gives
//! the jobs tables, not the machine (`COPY … FROM PROGRAM` needs a superuser).
//!
//! Names reach the server as bind parameters, and the server itself quotes them into the DDL
//! (`format('%I', …)`), which takes no parameters. A password never reaches the server at
//! all: it gets the SCRAM-SHA-256 verifier computed by the client ([`scram_verifier`]), so
//! not even a statement log or an error's context line can hold it.

use sluice::Result;
use sluice_protocol::Secret;
use sqlx::PgPool;

use crate::provision::scram_verifier;

/// Creates the login role `role` with `password` (or sets the password of an existing one,
/// and takes every privileged attribute away from it).
pub async fn ensure_role(superuser: &PgPool, role: &str, password: &Secret) -> Result<()> {
    let mut tx = superuser.begin().await?;
    sqlx::query(
        "SELECT set_config('sluice.role', $1, true), set_config('sluice.password', $2, true)",
    )
    .bind(role)
    .bind(scram_verifier(password.expose()))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "DO $$
         DECLARE
             name text := current_setting('sluice.role');
             secret text := current_setting('sluice.password');
         BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = name) THEN
                 EXECUTE format('CREATE ROLE %I LOGIN', name);
             END IF;
             EXECUTE format('ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD %L',
                            name, secret);
             -- Not $user first: a role named like the schema would otherwise create
             -- sqlx's migration table inside `sluice` once that exists, and lose track.
             EXECUTE format('ALTER ROLE %I SET search_path = public, sluice', name);
         END
         $$",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Creates `database` owned by `role`, or hands an existing one (made by an earlier sluice,
/// owned by the superuser) to `role`. Run [`take_schema`] on a connection to it afterwards.
pub async fn ensure_database(superuser: &PgPool, database: &str, role: &str) -> Result<()> {
    let owner: Option<(String,)> =
        sqlx::query_as("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1")
            .bind(database)
            .fetch_optional(superuser)
            .await?;
    if owner.as_ref().is_some_and(|(owner,)| owner == role) {
        return Ok(());
    }
    let mut conn = superuser.acquire().await?;
    sqlx::query(
        "SELECT set_config('sluice.role', $1, false), set_config('sluice.database', $2, false)",
    )
    .bind(role)
    .bind(database)
    .execute(&mut *conn)
    .await?;
    // CREATE DATABASE cannot run inside a DO block (a transaction): build the statement on
    // the server, quoted there, and run it as is.
    let (statement,): (String,) = sqlx::query_as(
        "SELECT CASE WHEN $1 THEN format('ALTER DATABASE %I OWNER TO %I',
                                         current_setting('sluice.database'),
                                         current_setting('sluice.role'))
                     ELSE format('CREATE DATABASE %I OWNER %I',
                                 current_setting('sluice.database'),
                                 current_setting('sluice.role')) END",
    )
    .bind(owner.is_some())
    .fetch_one(&mut *conn)
    .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// On a connection to `role`'s database as a superuser: hands `role` the `sluice` schema, all
/// it holds, and sqlx's migration table, where an earlier sluice created them as the
/// superuser (a no-op once they are `role`'s).
pub async fn take_schema(superuser_in_database: &PgPool, role: &str) -> Result<()> {
    let mut tx = superuser_in_database.begin().await?;
    sqlx::query("SELECT set_config('sluice.role', $1, true)")
        .bind(role)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DO $$
         DECLARE
             name text := current_setting('sluice.role');
             item record;
         BEGIN
             IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'sluice') THEN
                 EXECUTE format('ALTER SCHEMA sluice OWNER TO %I', name);
                 FOR item IN
                     SELECT c.relname, c.relkind FROM pg_class c
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'sluice' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                 LOOP
                     EXECUTE format('ALTER %s sluice.%I OWNER TO %I',
                                    -- Indexes and owned sequences follow their tables.
                                    CASE item.relkind WHEN 'v' THEN 'VIEW'
                                                      WHEN 'm' THEN 'MATERIALIZED VIEW'
                                                      WHEN 'f' THEN 'FOREIGN TABLE'
                                                      ELSE 'TABLE' END,
                                    item.relname, name);
                 END LOOP;
                 FOR item IN
                     SELECT p.oid::regprocedure AS signature FROM pg_proc p
                     JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = 'sluice'
                 LOOP
                     EXECUTE format('ALTER ROUTINE %s OWNER TO %I', item.signature, name);
                 END LOOP;
                 FOR item IN
                     SELECT t.typname FROM pg_type t
                     JOIN pg_namespace n ON n.oid = t.typnamespace
                     WHERE n.nspname = 'sluice' AND t.typtype = 'e'
                 LOOP
                     EXECUTE format('ALTER TYPE sluice.%I OWNER TO %I', item.typname, name);
                 END LOOP;
             END IF;
             IF to_regclass('public._sqlx_migrations') IS NOT NULL THEN
                 EXECUTE format('ALTER TABLE public._sqlx_migrations OWNER TO %I', name);
             END IF;
         END
         $$",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The statement that sets the superuser's password to `verifier` (a [`scram_verifier`]), for
/// a server in single-user mode: that reads statements from stdin and takes no bind
/// parameters, so the verifier is quoted in. It comes from [`scram_verifier`], never from
/// input, and holds no quote (base64, digits, `SCRAM-SHA-256`, `$` and `:`).
pub fn superuser_password_statement(verifier: &str) -> String {
    format!("ALTER ROLE postgres PASSWORD '{verifier}';\n")
}
