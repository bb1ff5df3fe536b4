#include "trace/trace-hw_mem_share.h"
