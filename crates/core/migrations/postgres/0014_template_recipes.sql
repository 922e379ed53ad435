-- Templates built through the API, by recipe, so every node builds them too.
CREATE TABLE template_recipes (
    name        TEXT PRIMARY KEY NOT NULL,
    spec        TEXT NOT NULL,
    built_by    TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
