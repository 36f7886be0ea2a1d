#include "CSamePortBuildInfo.h"

#ifndef SAMEPORT_GIT_COMMIT
#define SAMEPORT_GIT_COMMIT ""
#endif

const char *sameport_git_commit(void) {
    return SAMEPORT_GIT_COMMIT;
}
