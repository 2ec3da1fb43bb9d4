#pragma once
// moe: Mixture-of-Experts layers for the CPU. The umbrella header: includes the public headers.
#include "version.hpp"

#include "core/error.hpp"
#include "core/memory.hpp"
#include "core/threads.hpp"
#include "core/types.hpp"
#include "core/weight.hpp"
#include "core/workspace.hpp"

#include "balance/bias_balancer.hpp"
#include "balance/losses.hpp"
#include "balance/stats.hpp"

#include "experts/activations.hpp"
#include "experts/expert_concept.hpp"
#include "experts/feed_forward.hpp"
#include "experts/gated_feed_forward.hpp"
#include "experts/zero_compute.hpp"

#include "routing/capacity.hpp"
#include "routing/context.hpp"
#include "routing/expert_choice.hpp"
#include "routing/hash.hpp"
#include "routing/router_concept.hpp"
#include "routing/router_output.hpp"
#include "routing/routing.hpp"
#include "routing/soft.hpp"
#include "routing/presets.hpp"
#include "routing/top_k.hpp"

#include "dispatch/combine.hpp"
#include "dispatch/dispatch.hpp"
#include "dispatch/soft_dispatch.hpp"

#include "layer/moe_layer.hpp"
#include "layer/soft_moe_layer.hpp"
#include "layer/workspace.hpp"
