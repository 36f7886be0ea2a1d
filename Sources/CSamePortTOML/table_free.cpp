// toml++ is header-only: TOMLKit (pinned to 0.6.0 in Package.swift) compiles it from
// Sources/CTOML/Sources/toml.hpp, beside the public headers the include path already points at.
// Including that same header keeps toml::table's definition identical to the one that built the
// tree. A TOMLKit that moves the file fails the build here, not silently.
// toml++'s own code, not ours: its deprecation warnings are silenced for that header only.
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-literal-operator"
#include <CTOML/../../Sources/toml.hpp>
#pragma clang diagnostic pop
#include "CSamePortTOML.h"

extern "C" void sameport_toml_table_free(CTOMLTable *table) {
    delete reinterpret_cast<toml::table *>(table);
}
