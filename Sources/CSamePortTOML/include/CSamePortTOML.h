#ifndef CSAMEPORT_TOML_H
#define CSAMEPORT_TOML_H

#include <CTOML/CTOML.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Frees a document from TOMLKit's `tableCreateFromString` with everything in it. TOMLKit 0.6.0
/// allocates the table with `new` and never deletes it (its TOMLTable has no deinit, and its C
/// API no function that frees a table): without this, every parse leaks the whole tree.
void sameport_toml_table_free(CTOMLTable * _Nullable table);

#ifdef __cplusplus
}
#endif

#endif
