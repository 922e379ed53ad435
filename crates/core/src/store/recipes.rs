//! Templates built through the API, by recipe (their build request as JSON), so that
//! every node sharing the database builds them too.

use super::{q, ts, Cols, Db, Store, StoreError};
use time::OffsetDateTime;

impl Store {
    /// Records (or replaces) template `name`'s recipe, built by this node.
    pub async fn record_template(&self, name: &str, spec_json: &str) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query(
                "INSERT INTO template_recipes (name, spec, built_by, created_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO UPDATE SET \
                 spec = excluded.spec, built_by = excluded.built_by, \
                 created_at = excluded.created_at",
            )
            .bind(name)
            .bind(spec_json)
            .bind(self.node())
            .bind(ts(OffsetDateTime::now_utc()))
            .execute(pool)
            .await
            .map_err(q("record template"))?;
            Ok(())
        })
    }

    /// Every recorded recipe: (name, build request as JSON), by name.
    pub async fn template_recipes(&self) -> Result<Vec<(String, String)>, StoreError> {
        on_db!(self, pool => {
            let rows = sqlx::query("SELECT name, spec FROM template_recipes ORDER BY name")
                .fetch_all(pool)
                .await
                .map_err(q("template recipes"))?;
            rows.iter().map(|r| Ok((r.s("name")?, r.s("spec")?))).collect()
        })
    }

    /// Forgets template `name`'s recipe (deleted).
    pub async fn forget_template(&self, name: &str) -> Result<(), StoreError> {
        self.delete_where(
            "DELETE FROM template_recipes WHERE name = $1",
            name,
            "forget template",
        )
        .await
    }
}
