// Tests of the readers' flat name map (common/flat_string_map.h) against
// std::unordered_map.
#include "common/flat_string_map.h"

#include <random>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tests/check.h"

using namespace fastckpt;
using namespace fastckpt::testing;

// Random inserts (many repeated keys, growth from empty and from a reserve)
// and lookups of present and absent keys agree with std::unordered_map.
FASTCKPT_TEST(test_flat_string_map_matches_unordered_map) {
  std::mt19937 rng(7);
  std::vector<std::string> keys;
  for (int i = 0; i < 5000; ++i) keys.push_back("layers." + std::to_string(rng() % 3000) + ".w");
  keys.push_back("");
  bool same = true;
  for (size_t reserve : {size_t{0}, size_t{10}, keys.size()}) {
    FlatStringMap flat(reserve);
    std::unordered_map<std::string_view, uint32_t> ref;
    for (size_t i = 0; i < keys.size(); ++i) {
      const auto got = flat.emplace(keys[i], static_cast<uint32_t>(i));
      const auto want = ref.emplace(keys[i], static_cast<uint32_t>(i));
      same = same && got.second == want.second && got.first == want.first->second;
    }
    same = same && flat.size() == ref.size();
    for (int i = 0; i < 6000; ++i) {
      const std::string probe = "layers." + std::to_string(i) + ".w";
      const uint32_t* got = flat.find(probe);
      auto want = ref.find(probe);
      same = same && (got == nullptr) == (want == ref.end()) && (got == nullptr || *got == want->second);
    }
    flat.clear();
    same = same && flat.size() == 0 && flat.find(keys[0]) == nullptr;
  }
  expect(same, "FlatStringMap agrees with std::unordered_map");
}
