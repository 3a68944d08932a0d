/*
 * routing.h - glue between the core's route arguments and the shared
 * per-token rule of routing_logic.h, for host code and CUDA sources.
 */
#ifndef MOE_CORE_ROUTING_H
#define MOE_CORE_ROUTING_H

#include "backend.h"
#include "routing_logic.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The per-token parameters of routing_logic.h for a routing call. */
moe_rl_params moe_rl_params_from_args(const moe_route_args *args);

#ifdef __cplusplus
}
#endif

#endif /* MOE_CORE_ROUTING_H */
