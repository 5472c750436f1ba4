// Tests of the restricted pickle machine (formats/pickle_vm.h) on pickles
// written byte by byte: plain data comes back as data, a global that only a
// code-executing pickle names refuses the file by that name (whichever opcode
// names it), any other unknown class stays an inert placeholder, and malformed
// or oversized pickles are CheckpointErrors naming the file and the byte.
#include "formats/pickle_vm.h"

#include <cstdint>
#include <string>
#include <vector>

#include "tests/check.h"

using namespace fastckpt;
using namespace fastckpt::pickle;
using namespace fastckpt::testing;
using namespace std::string_literals;  // "\x00"s: a NUL inside a literal stays

namespace {

// Opcode spellings (pickle protocol 2-4) for the byte strings below.
std::string u32(uint32_t v) {
  std::string s(4, '\0');
  for (int i = 0; i < 4; ++i) s[static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}
std::string str(const std::string& s) { return "X" + u32(static_cast<uint32_t>(s.size())) + s; }
std::string global(const std::string& module, const std::string& name) {
  return "c" + module + "\n" + name + "\n";
}
std::string stack_global(const std::string& module, const std::string& name) {
  return str(module) + str(name) + "\x93";
}
const std::string kProto2 = "\x80\x02";

struct Outcome {
  std::string error;  // "" when the pickle ran to STOP
  Kind kind = Kind::None;
  std::string text;   // the result node's text, for globals and placeholders
};

Outcome run(const std::string& bytes, PickleLimits limits = {}) {
  PickleVM vm("/ckpt/model.pt", limits);
  Outcome out;
  out.error = error_of([&] {
    size_t consumed = 0;
    const Value v = vm.run(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), &consumed, "data.pkl");
    out.kind = v.kind;
    if (v.kind != Kind::None && v.kind != Kind::Int && v.kind != Kind::Bool && v.kind != Kind::Float)
      out.text = std::string(vm.node(v).text);
  });
  return out;
}

}  // namespace

FASTCKPT_TEST(test_pickle_vm_reads_plain_data) {
  // {"a": 1, "b": [True, None, 2.5]}, memoised as pickle.dumps(protocol=2) does.
  const std::string bytes = kProto2 + "}q\x00("s + str("a") + "K\x01" + str("b") + "]q\x01(\x88N" +
                            "G\x40\x04\x00\x00\x00\x00\x00\x00"s + "eu.";
  PickleVM vm("/ckpt/model.pt");
  size_t consumed = 0;
  const Value v = vm.run(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), &consumed, "data.pkl");
  bool ok = v.kind == Kind::Dict && consumed == bytes.size();
  const auto& items = vm.node(v).items;
  ok = ok && items.size() == 4 && vm.node(items[0]).text == "a" && items[1].kind == Kind::Int && items[1].i == 1;
  ok = ok && vm.node(items[2]).text == "b" && items[3].kind == Kind::List;
  if (ok) {
    const auto& list = vm.node(items[3]).items;
    ok = list.size() == 3 && list[0].kind == Kind::Bool && list[0].i == 1 && list[1].kind == Kind::None &&
         list[2].kind == Kind::Float && list[2].f == 2.5;
  }
  expect(ok, "a dict of an int and a list of True, None, 2.5 reads back as those values");

  // The memo: the same list twice is one node, not a copy.
  const std::string shared = kProto2 + "]q\x00h\x00\x86."s;
  PickleVM vm2("/ckpt/model.pt");
  const Value t = vm2.run(reinterpret_cast<const uint8_t*>(shared.data()), shared.size(), &consumed, "data.pkl");
  expect(t.kind == Kind::Tuple && vm2.node(t).items.size() == 2 &&
             vm2.node(t).items[0].node == vm2.node(t).items[1].node,
         "a memoised list referenced twice is one node");
}

FASTCKPT_TEST(test_pickle_vm_refuses_code_execution_globals_by_name) {
  const std::vector<std::pair<std::string, std::string>> refused = {
      {"os", "system"},          {"posix", "system"},      {"subprocess", "Popen"},
      {"builtins", "eval"},      {"builtins", "exec"},     {"builtins", "getattr"},
      {"builtins", "__import__"}, {"__builtin__", "open"}, {"functools", "partial"},
      {"operator", "attrgetter"}, {"importlib", "import_module"}, {"runpy", "run_path"},
  };
  for (const auto& [module, name] : refused) {
    const std::string qualified = module + "." + name;
    // os.system("true"): the global, its argument tuple, REDUCE.
    for (const std::string& naming : {global(module, name), stack_global(module, name)}) {
      const Outcome o = run(kProto2 + naming + str("true") + "\x85R.");
      expect(contains(o.error, "/ckpt/model.pt: data.pkl at byte ") &&
                 contains(o.error, "refers to '" + qualified + "'") && contains(o.error, "nothing was run"),
             qualified + (naming[0] == 'c' ? " (GLOBAL)" : " (STACK_GLOBAL)") + " refuses the file by name: " +
                 o.error);
    }
  }
}

FASTCKPT_TEST(test_pickle_vm_keeps_other_unknown_globals_inert) {
  // argparse.Namespace(lr=...) as fairseq checkpoints hold it: a placeholder object.
  Outcome o = run(kProto2 + global("argparse", "Namespace") + ")R}" + str("lr") + "K\x03sb.");
  expect(o.error.empty() && o.kind == Kind::Object && o.text == "argparse.Namespace",
         "argparse.Namespace() with state becomes a placeholder object (" + o.error + ")");
  o = run(kProto2 + stack_global("numpy.core.multiarray", "_reconstruct") + ".");
  expect(o.error.empty() && o.kind == Kind::Global && o.text == "numpy.core.multiarray._reconstruct",
         "a numpy global is an inert global value (" + o.error + ")");
  o = run(kProto2 + global("builtins", "set") + ".");
  expect(o.error.empty() && o.kind == Kind::Global, "builtins.set is a data type, not refused (" + o.error + ")");
  o = run(kProto2 + global("osx", "system") + ".");
  expect(o.error.empty(), "a module merely starting with 'os' is not refused (" + o.error + ")");
  o = run(kProto2 + global("builtins.set", "x") + ".");
  expect(contains(o.error, "refers to 'builtins.set.x'"), "a nested builtins name is refused: " + o.error);
}

FASTCKPT_TEST(test_pickle_vm_refuses_malformed_pickles) {
  struct Case {
    std::string bytes, part, what;
  };
  const std::vector<Case> cases = {
      {kProto2 + "}" + str("abc").substr(0, 7), "data.pkl is truncated", "a string cut short"},
      {kProto2 + "N", "data.pkl is truncated", "no STOP"},
      {kProto2 + ".", "pop from an empty stack", "STOP on an empty stack"},
      {"\x80\x06N.", "pickle protocol 6 is not supported", "protocol 6"},
      {kProto2 + "\xfe", "unsupported pickle opcode 0xfe", "an unknown opcode, named in hex"},
      {kProto2 + "h\x05.", "memo index 5 was never stored", "a memo read before any write"},
      {kProto2 + "(N" + "d.", "DICT with an odd number of items", "a dict with a key but no value"},
      {kProto2 + "Ns.", "empty stack", "SETITEM under nothing"},
      {kProto2 + "1.", "no MARK to pop", "POP_MARK without a MARK"},
      {kProto2 + "K\x01K\x02\x93.", "STACK_GLOBAL needs two strings", "STACK_GLOBAL of two ints"},
      {kProto2 + "c" + std::string(2000, 'm') + "\nx\n.", "GLOBAL name longer than 1024 bytes",
       "an endless GLOBAL line"},
      {kProto2 + "c\xff\xfe\nx\n.", "GLOBAL name is not valid UTF-8", "a GLOBAL name that is not UTF-8"},
      {kProto2 + "X" + u32(3) + "a\xffz.", "string is not valid UTF-8", "a string that is not UTF-8"},
      {kProto2 + "X" + u32(0xffffffffu) + "abc.", "data.pkl is truncated", "a string longer than the pickle"},
  };
  for (const Case& c : cases) {
    const Outcome o = run(c.bytes);
    expect(contains(o.error, "/ckpt/model.pt: ") && contains(o.error, c.part), c.what + ": " + o.error);
  }
}

FASTCKPT_TEST(test_pickle_vm_limits) {
  PickleLimits small;
  small.max_stack = 8;
  std::string deep = kProto2;
  for (int i = 0; i < 9; ++i) deep += "N";
  std::string msg;
  bool limit_error = false;
  try {
    PickleVM vm("/ckpt/model.pt", small);
    size_t consumed = 0;
    vm.run(reinterpret_cast<const uint8_t*>(deep.data()), deep.size(), &consumed, "data.pkl");
  } catch (const LimitError& e) {
    limit_error = true;
    msg = e.what();
  } catch (const CheckpointError& e) {
    msg = e.what();
  }
  expect(limit_error && contains(msg, "the stack limit"), "nine values on a stack of eight: LimitError (" + msg + ")");
  small = PickleLimits{};
  small.max_marks = 4;
  expect(contains(run(kProto2 + "(((((N.", small).error, "the nesting limit"), "five MARKs with a limit of four");
  small = PickleLimits{};
  small.max_memo = 16;
  expect(contains(run(kProto2 + "Nr" + u32(16) + ".", small).error, "exceeds the memo limit of 16"),
         "a memo index at the memo limit");
  expect(contains(run(kProto2 + "Nr" + u32(1u << 20) + ".").error, "jumps far past the memo"),
         "a memo index far past the memo");
}
