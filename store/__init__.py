"""Storage: database models, migrations, repositories and the state store."""
